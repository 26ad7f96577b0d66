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
