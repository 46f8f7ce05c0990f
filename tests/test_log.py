"""The rank-aware log: rank 0 on the console, every rank in run.dir/logs/rank<N>.log."""
import pytest

from common import log as run_log
from common.log import log


@pytest.fixture
def restore_console():
    yield
    run_log.setup(0)


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_0_alone_writes_to_the_console_and_every_rank_to_its_file(tmp_path, capsys, rank, restore_console):
    run_log.setup(rank)
    handler = run_log.to_file(tmp_path / "logs", rank)
    try:
        log.info("run dir: somewhere")
        log.warning("train.sync_bn=true needs CUDA")
    finally:
        run_log.remove(handler)
    out, err = capsys.readouterr()
    if rank == 0:
        assert (out, err) == ("run dir: somewhere\n", "warning: train.sync_bn=true needs CUDA\n")
    else:
        assert (out, err) == ("", "")
    lines = (tmp_path / "logs" / f"rank{rank}.log").read_text().splitlines()
    assert [line.split(f" rank {rank} ", 1)[1] for line in lines] == [
        "INFO run dir: somewhere", "WARNING train.sync_bn=true needs CUDA"]


def test_setting_up_twice_keeps_one_console_line_per_message(capsys, restore_console):
    run_log.setup(0)
    run_log.setup(0)
    log.info("once")
    assert capsys.readouterr().out == "once\n"


def test_a_removed_file_gets_no_more_lines(tmp_path, restore_console):
    run_log.setup(0)
    handler = run_log.to_file(tmp_path, 0)
    log.info("kept")
    run_log.remove(handler)
    log.info("not kept")
    assert (tmp_path / "rank0.log").read_text().count("kept") == 1
