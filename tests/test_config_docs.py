"""docs/config.md is generated from the config schema (sft/config_docs.py) and must match it."""
from conftest import REPO
from sft.config import Config, FileSource, SQLSource
from sft.config_docs import REGENERATE, documented_fields, render, sections


def test_config_reference_is_in_sync_with_the_schema():
    assert (REPO / "docs" / "config.md").read_text() == render(), (
        f"docs/config.md is out of date with sft/config.py; regenerate it: {REGENERATE} (or make docs)")


def test_every_config_field_has_a_description():
    tables = [*sections(Config, ""), ("data source", FileSource), ("data source", SQLSource)]
    missing = [f"{path}.{name}".lstrip(".") for path, section in tables
               for name, field in documented_fields(section) if not field.description and not section_type(field)]
    assert not missing, f"give these fields a pydantic Field(description=...) in sft/config.py: {missing}"


def test_reference_lists_every_key_pydantic_knows():
    """Every key in pydantic's own JSON schema of the config (an independent walk of the models) has a row."""
    schema = Config.model_json_schema()
    definitions = schema["$defs"]
    text = render()

    def keys(properties: dict, path: str) -> list[str]:
        found = []
        for name, field in properties.items():
            full = f"{path}.{name}" if path else name
            found.append(full)
            if "$ref" in field:  # a section
                found += keys(definitions[field["$ref"].split("/")[-1]]["properties"], full)
        return found

    config_keys = [key for key in keys(schema["properties"], "") if key != "config_path"]  # set by load_config
    source_keys = [*definitions["FileSource"]["properties"], *definitions["SQLSource"]["properties"]]
    assert "training.learning_rate" in config_keys and "method.lora.r" in config_keys and "query" in source_keys
    missing = [key for key in config_keys + source_keys if f"| `{key}` |" not in text]
    assert not missing, f"not in docs/config.md: {missing}"


def section_type(field) -> bool:
    return isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields")
