"""The preemption handler in this process: a signal sets the flag (nothing else), repeated signals
keep the first name, a third SIGINT stops without a checkpoint, and uninstall restores the old
handlers. The launchers' real signals: tests/integration/train/test_preemption.py."""

import os
import signal

import pytest

from dsexit.train.cluster.preemption import FORCE_AFTER_SIGINTS, PreemptionHandler


@pytest.fixture
def handler():
    installed = PreemptionHandler(watch_launcher=False).install()
    yield installed
    installed.uninstall()


def _deliver(signum: int) -> None:
    """Send `signum` to this process; Python runs the handler before the next bytecode after the call."""
    os.kill(os.getpid(), signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_only_sets_the_flag(handler, signum):
    assert not handler.requested and handler.signal_name is None
    _deliver(signum)  # the process survives: the handler raised nothing and exited nothing
    assert handler.requested and handler.signal_name == signal.Signals(signum).name


def test_repeated_signals_keep_the_first_name_and_do_not_stop_the_save(handler):
    _deliver(signal.SIGTERM)
    _deliver(signal.SIGTERM)  # the launcher forwards its own copy
    _deliver(signal.SIGINT)
    assert handler.signal_name == "SIGTERM" and handler.sigints == 1


def test_the_third_sigint_raises_keyboard_interrupt_and_restores_the_old_handlers():
    before = signal.getsignal(signal.SIGINT)
    handler = PreemptionHandler(watch_launcher=False).install()
    try:
        for _ in range(FORCE_AFTER_SIGINTS - 1):
            _deliver(signal.SIGINT)
        assert handler.sigints == FORCE_AFTER_SIGINTS - 1 and signal.getsignal(signal.SIGINT) != before
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == before  # Ctrl-C is the caller's again
    finally:
        handler.uninstall()


def test_uninstall_gives_back_the_handlers_it_found():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    handler = PreemptionHandler(watch_launcher=False).install()
    assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    handler.uninstall()
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_plain_python_parent_is_not_watched():
    """`nohup python launch/pretrain.py &` must outlive the shell that started it: no watch."""
    from dsexit.train.cluster.preemption import launcher_lineage

    assert launcher_lineage() == []  # pytest's parent is a shell or CI runner, not a launcher
