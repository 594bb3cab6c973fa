"""The GPU table: every GPU listed with its source, and found by name however it is written."""

import pytest

from camelid.cli import main
from camelid.cost.gpus import GPUS, find_gpu
from camelid.errors import CamelidError


def test_cli_lists_every_gpu_with_a_source(capsys):
    code = main(["cost", "--list-gpus"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L40S", "A10G", "RTX-4090", "RTX-3090",
                 "V100", "T4"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        assert "https://" in row
    assert set(GPUS) == {find_gpu(name.lower()).name for name in GPUS}


def test_a_gpu_is_found_whatever_its_case_spaces_and_underscores():
    assert find_gpu(" h100 sxm ").name == "H100-SXM" and find_gpu("rtx_4090").name == "RTX-4090"
    with pytest.raises(CamelidError, match="unknown GPU 'B200'; choose one of: A100-40GB, A100-80GB"):
        find_gpu("B200")
