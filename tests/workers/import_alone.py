"""Imports each named module alone: one forked child per module, from a parent that holds no project module.

`python -m tests.workers.import_alone --preload torch,numpy,... MODULE ...` prints `MODULE<TAB>traceback` for each
module whose import fails and exits 1 if any did. The parent imports the third-party libraries first, so the
children share them instead of each paying torch's second of import; what a child imports of the project is its
own, from nothing, as in a fresh `python -c "import MODULE"`.
"""
import importlib
import os
import sys
import traceback


def _preload(names: list) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional extra (onnx, wandb) that is absent: the child says so if it matters
            pass


def _import_in_child(module: str, report) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:  # noqa: BLE001 - whatever the import raised is this module's failure
            report.write(f"{module}\t{traceback.format_exc()!r}\n")
            report.flush()
            os._exit(1)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main(argv: list) -> int:
    preload = argv[1].split(",") if argv and argv[0] == "--preload" else []
    modules = argv[2:] if preload else argv
    _preload(preload)
    project = {m.split(".")[0] for m in modules}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in project)
    if loaded:
        print(f"the preload imported project modules: {loaded}", file=sys.stderr)
        return 2
    failed = [m for m in modules if _import_in_child(m, sys.stdout) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
