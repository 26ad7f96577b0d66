"""Secret masking: values that came from secret-looking variables never reach a log, config copy or manifest."""
import logging
import re
from typing import Any

# A name part ending in one of these words: HF_TOKEN, WANDB_API_KEY, WANDB_KEY, DB_PASS, PGPASSWORD, APIKEY,
# AWS_SECRET_ACCESS_KEY... but not TOKENIZERS_PARALLELISM (masking its "false" would garble every file).
SECRET_NAME = re.compile(r"(^|_)[A-Z0-9]*(TOKEN|SECRET|PASSWORD|PASSWD|PASS|KEY|CREDENTIALS?)(_|$)", re.IGNORECASE)
# user:password@host in database URLs
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]+:)(?P<password>[^@\s]+)(?P<tail>@)", re.IGNORECASE)
MASK = "***"

_secret_values: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a value to mask; very short values are skipped because masking them would garble text."""
    if len(value) >= 4:
        _secret_values.add(value)


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def register_secrets_from(variables: dict[str, str | None]) -> None:
    """Every secret-named variable, whether or not the config refers to it: a library (huggingface_hub reads
    HF_TOKEN, a database driver reads PGPASSWORD) may put it into an error message or a log line."""
    for name, value in variables.items():
        if value and is_secret_name(name):
            register_secret(value)


def mask(text: str) -> str:
    for value in sorted(_secret_values, key=len, reverse=True):
        text = text.replace(value, MASK)
    return URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], text)


def mask_values(value: Any) -> Any:
    """Mask every string inside nested dicts and lists: done before JSON or YAML encoding, which would escape a
    secret's quotes, backslashes or non-ASCII letters past mask()."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {key: mask_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_values(item) for item in value]
    return value


class MaskingFilter(logging.Filter):
    """Logging filter that masks secrets in every record, whatever library emitted it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask(record.getMessage())
        record.args = None
        return True
