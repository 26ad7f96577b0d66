"""Secret masking: values that came from secret-looking variables never reach a log, config copy or manifest."""
import logging
import re

SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.IGNORECASE)
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


def mask(text: str) -> str:
    for value in sorted(_secret_values, key=len, reverse=True):
        text = text.replace(value, MASK)
    return URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], text)


class MaskingFilter(logging.Filter):
    """Logging filter that masks secrets in every record, whatever library emitted it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask(record.getMessage())
        record.args = None
        return True
