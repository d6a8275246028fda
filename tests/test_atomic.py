"""Temps a killed writer leaves are removed by the next write of the same path, and only those."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nacd.atomic import owner_tag, sweep_dead_temps, temp_dir_beside, temp_file_beside

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from nacd.atomic import temp_dir_beside, temp_file_beside
    final = Path(sys.argv[1])
    tmp = temp_dir_beside(final)
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    fd, _ = temp_file_beside(final)
    os.write(fd, b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed_writer(final: Path) -> list[Path]:
    """The temps of a process killed mid-write of ``final``."""
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(final)], check=False)
    assert run.returncode == -signal.SIGKILL
    left = sorted(p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}.tmp-"))
    assert len(left) == 2
    return left


def test_the_next_writer_removes_a_killed_writers_temps_and_keeps_live_and_foreign_ones(tmp_path):
    final = tmp_path / "out" / "epoch-001"
    dead = _killed_writer(final)
    dead_other = _killed_writer(final.with_name("epoch-002"))  # a path this run never writes again
    live = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from nacd.atomic import temp_dir_beside
        print(temp_dir_beside(Path(sys.argv[1])), flush=True)
        time.sleep(60)
    """), str(final)], stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = Path(live.stdout.readline().strip())
        assert f"~{live.pid}-" in live_tmp.name
        # a dead PID's temps on another machine under another host name, under this host name after
        # another boot or in another PID namespace, and one this module did not name
        host, machine, _ = owner_tag().split("~")
        kept = [final.parent / f".{final.name}.tmp-{h}~{m}~999999-abc" for h, m in (
            ("otherhost", machine), (host, "0123456789abcdef." + machine.split(".")[1]),
            (host, machine.split(".")[0] + ".1"), (host, "unknown"))]
        kept.append(final.parent / f".{final.name}.tmp-crashed")
        for p in kept:
            p.mkdir()
        mine = temp_dir_beside(final)
        left = set(final.parent.iterdir())
        assert not set(dead + dead_other) & left
        assert {live_tmp, mine, *kept} <= left
    finally:
        live.kill()
        live.wait()
    # once the sleeper is gone, its temp goes too (and this process's own never does)
    assert sweep_dead_temps(final.parent) == [live_tmp]
    assert mine.exists()


def test_nothing_is_swept_where_the_boot_or_namespace_cannot_be_read(tmp_path, monkeypatch):
    from nacd import atomic

    final = tmp_path / "shard.arrow"
    dead = _killed_writer(final)
    monkeypatch.setattr(atomic, "_machine", lambda: None)
    assert atomic.sweep_dead_temps(tmp_path) == [] and all(p.exists() for p in dead)


def test_storage_write_sweeps_what_a_killed_write_of_the_same_file_left(tmp_path):
    from nacd import storage

    final = tmp_path / "shards" / "shard-00000.arrow"
    _killed_writer(final)
    storage.write_bytes(str(final), b"whole")
    assert final.read_bytes() == b"whole"
    assert [p.name for p in final.parent.iterdir()] == ["shard-00000.arrow"]


def test_a_stage_folder_rebuilt_after_a_kill_leaves_nothing_beside_it(tmp_path):
    from nacd.data.variants import atomic_dir

    final = tmp_path / "random"
    _killed_writer(final)
    with atomic_dir(final, "variant.json") as tmp:
        (tmp / "variant.json").write_text("{}")
    with atomic_dir(final, "variant.json") as tmp:  # a rerun replaces it through a set-aside copy, also removed
        (tmp / "variant.json").write_text('{"again": true}')
    assert [p.name for p in tmp_path.iterdir()] == ["random"]
    assert (final / "variant.json").read_text() == '{"again": true}'


def test_a_temp_file_is_hidden_and_owned(tmp_path):
    fd, path = temp_file_beside(tmp_path / "a" / "record.json")
    os.close(fd)
    assert path.parent == tmp_path / "a" and path.name.startswith(".record.json.tmp-" + owner_tag() + "-")


@pytest.mark.parametrize("existing", ["file", "user_folder", "link"])
def test_a_stage_never_replaces_what_it_did_not_write(tmp_path, existing):
    """A mistyped --out: a file, a folder of the user's, or a link is refused before any work,
    and left exactly as it was."""
    from nacd.data.variants import OutputError, atomic_dir

    final = tmp_path / "out"
    if existing == "file":
        final.write_text("precious")
    elif existing == "user_folder":
        final.mkdir()
        (final / "notes.txt").write_text("precious")
    else:
        (tmp_path / "elsewhere").mkdir()
        final.symlink_to(tmp_path / "elsewhere")
    ran = []
    with pytest.raises(OutputError, match=str(final)):
        with atomic_dir(final, "variant.json") as tmp:
            ran.append(tmp)
    assert ran == [], "refused before the stage's work"
    if existing == "file":
        assert final.read_text() == "precious"
    elif existing == "user_folder":
        assert (final / "notes.txt").read_text() == "precious"
    else:
        assert final.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + (["elsewhere"] if existing == "link" else []))


def test_an_empty_folder_or_an_earlier_output_is_replaced_and_a_stage_must_finish(tmp_path):
    from nacd.data.variants import atomic_dir

    final = tmp_path / "out"
    final.mkdir()  # e.g. made by the orchestrator for the artifact
    with atomic_dir(final, "variant.json") as tmp:
        (tmp / "variant.json").write_text("1")
    with atomic_dir(final, "variant.json") as tmp:
        (tmp / "variant.json").write_text("2")
    assert (final / "variant.json").read_text() == "2"
    with pytest.raises(RuntimeError, match="wrote no variant.json"):
        with atomic_dir(final, "variant.json") as tmp:
            (tmp / "data.jsonl").write_text("half")
    assert sorted(p.name for p in final.iterdir()) == ["variant.json"], "the earlier output is kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_prepare_and_project_refuse_a_foreign_out_before_their_work(tmp_path, monkeypatch):
    """The check runs before the stage's work: its first library call is never reached."""
    from nacd.config import RunConfig
    from nacd.data import prepare
    from nacd.data.variants import OutputError
    from nacd.projection import project_ids

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")

    def never(*args, **kwargs):
        raise AssertionError("the stage's work started")

    monkeypatch.setattr(prepare, "tokenize_rows", never)
    with pytest.raises(OutputError, match="choose another output path"):
        prepare.prepare_data(RunConfig(), foreign)
    with pytest.raises(OutputError, match="choose another output path"):
        project_ids(RunConfig(), tmp_path / "no-synthetic", foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
