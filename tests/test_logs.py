"""Run logs: one file per run, appended on restart, no colour codes, secrets masked."""
import logging

from sft.logs import add_run_log, close_run_log
from sft.secrets import register_secret


def test_restart_appends_to_the_first_log_without_colour_codes_or_secrets(tmp_path):
    register_secret("hf_secret_value")
    log = logging.getLogger("sft")
    first = add_run_log(tmp_path, resumed=False)
    log.warning("\x1b[1mbold\x1b[0m token=hf_secret_value")
    again = add_run_log(tmp_path, resumed=True)
    log.warning("after restart")
    close_run_log()
    log.warning("after the run")
    assert again == first and first.name.startswith("sft_log_")
    text = first.read_text()
    assert "bold token=***" in text and "\x1b" not in text and "hf_secret_value" not in text
    assert "after restart" in text and "after the run" not in text


def test_bitsandbytes_cpu_kernel_advice_stays_out_of_the_log_but_its_errors_do_not(caplog):
    """bitsandbytes' import-time warning (a CPU 4-bit kernel it could not fetch; "pip install kernels") printed as
    the first line of every LoRA run in the GPU image on AVX512-BF16 hosts, where sft never runs 4-bit on a CPU."""
    import sft.logs  # noqa: F401 (importing it sets the level, before any run imports peft and so bitsandbytes)

    bitsandbytes_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    bitsandbytes_cpu.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
    bitsandbytes_cpu.error("a real bitsandbytes error")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes error"]
