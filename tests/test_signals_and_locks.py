"""A run ended by SIGTERM (torchrun's and Slurm's time limit) leaves no half-written temporary
file, and a run holds its --out: a second run into it exits 2 naming the first, and the lock
of a process that died is taken over."""
import signal
import subprocess
import sys
import textwrap
import time

import pytest

_WRITER = textwrap.dedent("""
    import os, sys, time
    from alignscan import outputs, runtime
    if sys.argv[2] == "handled":
        runtime.exit_on_sigterm()
    real_fsync = os.fsync
    def slow_fsync(fd):            # a long write: the signal arrives while the temporary file exists
        print("writing", flush=True)
        time.sleep(30)
        real_fsync(fd)
    os.fsync = slow_fsync
    outputs.write_bytes(os.path.join(sys.argv[1], "result.bin"), b"x" * 1000)
""")


def _terminated_writer(folder, mode):
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder), mode], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], "the temporary file exists"
    writer.send_signal(signal.SIGTERM)
    return writer.wait(timeout=60)


def test_sigterm_during_an_atomic_write_leaves_no_temporary_file(tmp_path):
    assert _terminated_writer(tmp_path, "handled") == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []                  # neither the result nor its temporary file


def test_without_the_handler_the_default_action_would_leave_it(tmp_path):
    """Why the command line installs the handler: the default action kills the process where
    it stands, and the temporary file stays behind."""
    assert _terminated_writer(tmp_path, "default") == -signal.SIGTERM
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


_HOLDER = textwrap.dedent("""
    import sys, time
    from alignscan.outputs import hold_folder
    with hold_folder(sys.argv[1], "alignscan finetune --out " + sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_run_into_a_held_out_exits_2_naming_the_first_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "alignscan", "flops", "--quick", "--out", str(tmp_path)],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {holder.pid}" in second.stderr and "alignscan finetune" in second.stderr
        assert "Traceback" not in second.stderr and not (tmp_path / "flops.json").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert (tmp_path / ".alignscan.lock").exists()              # the dead holder's lock file is still there
    third = subprocess.run([sys.executable, "-m", "alignscan", "flops", "--quick", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-2000:]
    taken = (tmp_path / ".alignscan.lock").read_text()
    assert taken.startswith("pid ") and f"pid {holder.pid}:" not in taken and "alignscan flops" in taken
