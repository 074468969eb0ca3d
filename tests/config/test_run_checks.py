"""Expected failures end as one line naming the field, exit 2, before any process group exists.

The checks a run needs beyond single fields (sequence parallelism and the TP size, the global
batch and the data-parallel size, an empty data.train) run at load time, also for --dry-run.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from soda_mega.cli import main
from soda_mega.config import load_config
from soda_mega.config.fields import ConfigError
from soda_mega.config.schema import check_run_layout
from soda_mega.data.read.source import DatasetError
from soda_mega.data.write.inputs import InputError
from soda_mega.errors import EXIT_USER_ERROR, SodaUserError
from soda_mega.eval.manifest import ManifestError

SP_ODD = ["--parallel.tensor_parallel=2", "--parallel.sequence_parallel=true",
          "--model.seq_length=127"]


def test_expected_errors_share_one_base_class():
    for cls in (ConfigError, DatasetError, InputError, ManifestError):
        assert issubclass(cls, SodaUserError), cls


def test_sequence_parallel_needs_a_seq_length_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"model\.seq_length=127 .*parallel\.tensor_parallel=2"):
        load_config(preset="tiny", overrides=SP_ODD)
    load_config(preset="tiny", overrides=SP_ODD[:2] + ["--model.seq_length=126"])


def test_dry_run_refuses_sequence_parallel_with_an_odd_seq_length(capsys):
    assert main(["train", "--preset", "tiny", *SP_ODD, "--dry-run", "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "model.seq_length=127" in err and "Traceback" not in err


@pytest.mark.parametrize("world, batch, micro, ok", [
    (2, 8, 2, True), (2, 6, 2, False), (4, 8, 2, True), (3, 9, 3, True), (2, 7, 1, False)])
def test_global_batch_must_split_over_data_parallel_micro_batches(world, batch, micro, ok):
    cfg = load_config(preset="tiny", overrides=[f"--training.global_batch_size={batch}",
                                                f"--training.micro_batch_size={micro}"])
    if ok:
        check_run_layout(cfg, world)
        return
    with pytest.raises(ConfigError, match=rf"training\.global_batch_size: {batch} .*"
                                          rf"training\.micro_batch_size={micro} x data-parallel size {world}"):
        check_run_layout(cfg, world)


def test_train_refuses_an_empty_data_train_before_starting(tmp_path, capsys):
    # (a session fixture of earlier tests may have set up torch.distributed in this process)
    was_initialized = dist.is_initialized()
    rc = main(["train", "--preset", "tiny", "--data.train=[]", f"--run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR, err
    assert "data.train: no datasets given" in err and "Traceback" not in err
    assert dist.is_initialized() == was_initialized  # refused before any process group was made


def test_any_soda_user_error_ends_as_one_line_and_exit_2(monkeypatch, capsys):
    class BrokenThing(SodaUserError):
        pass

    def run(args):
        raise BrokenThing("things/x.bin: byte 12 is 7, expected 0 or 1")

    import soda_mega.commands.model_info as model_info
    monkeypatch.setattr(model_info, "run", run)
    assert main(["model", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err == "soda-mega: error: things/x.bin: byte 12 is 7, expected 0 or 1\n"
