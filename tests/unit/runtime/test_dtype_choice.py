"""--dtype auto: the rule from what the hardware reports to the compute dtype and the reason given for it."""

from pathlib import Path

import pytest
import torch

from extract.runtime import device
from extract.runtime.device import (DtypeChoice, agreed_dtype, auto_cpu_dtype, auto_gpu_dtype, choose_dtype,
                                   cpuinfo_flags)

# What torch.cpu.get_capabilities() reports, in part, on an Intel Sapphire Rapids and on an AMD EPYC (Zen 4).
SAPPHIRE_RAPIDS = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_tile": True,
                   "amx_bf16": True, "amx_int8": True}
EPYC_ZEN4 = {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True, "amx_tile": False,
             "amx_bf16": False, "amx_int8": False}
# The flags line of /proc/cpuinfo on a Sapphire Rapids VM, shortened.
CPUINFO_WITH_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu vme avx2 avx512f avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""


def test_a_cpu_with_amx_bf16_gets_bf16_and_says_why():
    choice = auto_cpu_dtype(SAPPHIRE_RAPIDS, "torch.cpu.get_capabilities()")
    assert choice == DtypeChoice(torch.bfloat16,
                                 "auto: this CPU has bf16 matrix units (AMX, from torch.cpu.get_capabilities())")


def test_a_cpu_without_amx_gets_fp32_even_with_avx512_bf16_and_hears_of_bf16():
    choice = auto_cpu_dtype(EPYC_ZEN4, "torch.cpu.get_capabilities()")
    assert choice == DtypeChoice(torch.float32,
                                 "auto: this CPU has no bf16 matrix units (no AMX, from torch.cpu.get_capabilities()); "
                                 "it has avx512_bf16, with which --dtype bf16 can be faster (docs/benchmarks.md)")
    without_bf16 = auto_cpu_dtype({**EPYC_ZEN4, "avx512_bf16": False}, "/proc/cpuinfo")
    assert without_bf16 == DtypeChoice(torch.float32,
                                       "auto: this CPU has no bf16 matrix units (no AMX, from /proc/cpuinfo)")


def test_amx_tiles_without_their_bf16_instructions_are_not_enough():
    assert auto_cpu_dtype({**SAPPHIRE_RAPIDS, "amx_bf16": False}, "x").dtype == torch.float32
    assert auto_cpu_dtype({"architecture": "aarch64", "bf16": True, "sme": True}, "x").dtype == torch.float32


def test_a_cpu_that_reports_nothing_gets_fp32_and_the_reason():
    choice = auto_cpu_dtype(None, "/proc/cpuinfo is unreadable")
    assert choice == DtypeChoice(torch.float32,
                                 "auto: fp32, as bf16 matrix units (AMX) could not be looked for: /proc/cpuinfo is "
                                 "unreadable")


def test_gpus_keep_their_rule():
    assert auto_gpu_dtype((8, 0)) == DtypeChoice(torch.bfloat16,
                                                 "auto: a GPU of compute capability 8.0 (8.0 or newer: fast bf16)")
    assert auto_gpu_dtype((9, 0)).dtype == torch.bfloat16
    assert auto_gpu_dtype((7, 5)) == DtypeChoice(torch.float32,
                                                 "auto: a GPU of compute capability 7.5 (bf16 needs 8.0 or newer)")


@pytest.mark.parametrize("requested, dtype",
                         [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_a_requested_dtype_is_taken_as_it_is(requested, dtype):
    assert choose_dtype(requested, torch.device("cpu")) == DtypeChoice(dtype, f"--dtype {requested} as requested")


def test_cpuinfo_flags_are_read_from_the_first_processor():
    flags = cpuinfo_flags(CPUINFO_WITH_AMX)
    assert {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags and "spectre_v1" not in flags
    assert auto_cpu_dtype(dict.fromkeys(flags, True), "/proc/cpuinfo").dtype == torch.bfloat16
    assert cpuinfo_flags("processor\t: 0\nmodel name\t: no flags here\n") == set()


def test_without_torchs_report_the_choice_falls_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # as in a torch that lacks it
    monkeypatch.setattr(device, "CPUINFO", tmp_path / "cpuinfo")
    (tmp_path / "cpuinfo").write_text(CPUINFO_WITH_AMX)
    assert choose_dtype("auto", torch.device("cpu")) == DtypeChoice(
        torch.bfloat16, f"auto: this CPU has bf16 matrix units (AMX, from {tmp_path / 'cpuinfo'})")
    (tmp_path / "cpuinfo").unlink()
    choice = choose_dtype("auto", torch.device("cpu"))
    assert choice.dtype == torch.float32
    assert choice.reason == (f"auto: fp32, as bf16 matrix units (AMX) could not be looked for: this torch has no "
                             f"torch.cpu.get_capabilities() and {tmp_path / 'cpuinfo'} is unreadable "
                             f"(No such file or directory)")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_torch_and_linux_agree_on_this_cpus_matrix_units():
    flags = cpuinfo_flags(Path("/proc/cpuinfo").read_text())
    if not flags:
        pytest.skip("/proc/cpuinfo lists no flags on this architecture")
    from_linux = auto_cpu_dtype(dict.fromkeys(flags, True), "/proc/cpuinfo")
    assert choose_dtype("auto", torch.device("cpu")).dtype == from_linux.dtype


def test_ranks_that_choose_differently_all_run_fp32():
    amx = DtypeChoice(torch.bfloat16, "auto: this CPU has bf16 matrix units (AMX, from x)")
    no_amx = DtypeChoice(torch.float32, "auto: this CPU has no bf16 matrix units (no AMX, from x)")
    assert agreed_dtype([amx, amx]) == amx
    assert agreed_dtype([no_amx]) == no_amx
    assert agreed_dtype([amx, amx, no_amx]) == DtypeChoice(
        torch.float32, f"fp32: ranks chose different dtypes (rank 0: {amx.reason}; rank 2: {no_amx.reason})")
