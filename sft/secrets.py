"""Secret masking: values that came from secret-looking variables never reach a log, config copy or manifest, and
text that only happens to contain one (a path, a longer word) stays as it is."""
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
# Config values the user wrote that contain a secret's value without coming from its variable (a model path
# /data/review-X0l2/llama beside PGPASSWORD=review): shown as they are wherever they occur whole.
_public_texts: set[str] = set()


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


def register_public(text: str) -> None:
    """A config value the user wrote, not taken from a secret variable: if a secret's value is a word of it, it is
    shown as written wherever it occurs whole. Not when it is a secret value itself or holds a URL password."""
    if text not in _secret_values and not URL_PASSWORD.search(text) and \
            any(re.search(_as_word(value), text) for value in _secret_values):
        _public_texts.add(text)


def mask(text: str) -> str:
    """Each secret value where it stands as a whole word (so `review` is masked in `password review` but not in
    `reviewer`, nor `2000` in `20000`), except inside a public text; then passwords in database URLs."""
    if _secret_values:
        # One scan, public texts tried first at each position: a match of the first group is kept as it is.
        publics = "|".join(re.escape(t) for t in sorted(_public_texts, key=len, reverse=True))
        words = "|".join(_as_word(v) for v in sorted(_secret_values, key=len, reverse=True))
        pattern = f"({publics})|{words}" if publics else words
        text = re.sub(pattern, lambda m: m[0] if publics and m[1] else MASK, text)
    return mask_url_passwords(text)


def mask_url_passwords(text: str) -> str:
    return URL_PASSWORD.sub(lambda m: m["head"] + MASK + m["tail"], text)


def _as_word(value: str) -> str:
    """A pattern for VALUE not glued to a letter, digit or underscore on a side where it starts or ends with one."""
    return (r"(?<!\w)" if re.match(r"\w", value) else "") + re.escape(value) + \
        (r"(?!\w)" if re.search(r"\w$", value) else "")


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
