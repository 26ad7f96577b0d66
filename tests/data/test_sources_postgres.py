"""PostgreSQL sources against a real server (tests/postgres_server.py): rows streamed in chunks into Arrow,
read-only, a statement timeout, a content hash of the rows, and one-line errors that never show the password."""
import pytest
from conftest import write_jsonl
from postgres_server import PostgresServer, PostgresUnavailable

from sft.config import SQLSource, load_config
from sft.data import prepare, read_source
from sft.data.sources import SQL_CHUNK_ROWS
from sft.errors import UserError

pytestmark = pytest.mark.postgres
BIG_ROWS = int(2.5 * SQL_CHUNK_ROWS)  # more than two chunks


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as error:
        pytest.skip(f"no PostgreSQL server: {error}")
    server.execute(
        "CREATE TABLE reviews (id int PRIMARY KEY, body text, verdict text)",
        "INSERT INTO reviews SELECT i, 'review ' || i, CASE WHEN i % 3 = 0 THEN 'neg' ELSE 'pos' END "
        "FROM generate_series(1, 30) AS i",
        "CREATE SEQUENCE counter",
        "CREATE TABLE big (id int PRIMARY KEY, prompt text, completion text)",
        f"INSERT INTO big SELECT i, 'question ' || i, ' answer ' || (i * 7) FROM generate_series(1, {BIG_ROWS}) AS i")
    yield server
    server.stop()


def source(server, query, **settings) -> SQLSource:
    return SQLSource(database=server.url(), query=query, **settings)


def test_a_table_larger_than_one_chunk_streams_into_arrow_in_chunks(postgres, tmp_path):
    rows = read_source(source(postgres, "SELECT prompt, completion FROM big ORDER BY id"), "data.train", tmp_path)
    assert len(rows) == BIG_ROWS and rows.files[0].rows == BIG_ROWS
    assert rows.dataset[0] == {"prompt": "question 1", "completion": " answer 7"}
    assert rows.dataset[BIG_ROWS - 1]["completion"] == f" answer {BIG_ROWS * 7}"
    # Written one chunk at a time: the memory-mapped Arrow file holds one record batch per fetched chunk.
    assert [len(batch) for batch in rows.dataset.data.to_batches()] == [SQL_CHUNK_ROWS, SQL_CHUNK_ROWS,
                                                                      BIG_ROWS - 2 * SQL_CHUNK_ROWS]
    assert rows.where(BIG_ROWS - 1).endswith(f": query row {BIG_ROWS}")


def test_the_content_hash_follows_the_rows_and_the_password_is_never_recorded(postgres, tmp_path):
    query = "SELECT body AS text, verdict AS label FROM reviews ORDER BY id"
    before = read_source(source(postgres, query), "data.train", tmp_path).files[0]
    same = read_source(source(postgres, query), "data.train", tmp_path).files[0]
    postgres.execute("UPDATE reviews SET verdict = 'neg' WHERE id = 1")
    try:
        after = read_source(source(postgres, query), "data.train", tmp_path).files[0]
    finally:
        postgres.execute("UPDATE reviews SET verdict = 'pos' WHERE id = 1")
    assert before.sha256 == same.sha256 != after.sha256
    assert postgres.password not in before.source and "***" in before.source and query in before.source


def test_queries_run_read_only(postgres, tmp_path):
    setting = read_source(source(postgres, "SELECT current_setting('transaction_read_only') AS ro"), "data.train",
                          tmp_path)
    assert setting.dataset[0]["ro"] == "on"
    with pytest.raises(UserError, match=r"cannot execute nextval\(\) in a read-only transaction"):
        read_source(source(postgres, "SELECT nextval('counter') AS n"), "data.train", tmp_path)


@pytest.mark.parametrize("case, expected", [
    ("syntax", r"^data.train.query: syntax error at or near \"SELEC\"; check the SQL against postgresql://sft:\*\*\*@"),
    ("missing table", r"^data.train.query: relation \"nope\" does not exist; check the SQL"),
    ("wrong password", r"^data.train.database: cannot connect to postgresql://sft:\*\*\*@127.0.0.1:\d+/postgres: .*"
                       r"password authentication failed for user \"sft\""),
    ("unreachable host", r"^data.train.database: cannot connect to postgresql://sft:\*\*\*@127.0.0.1:\d+/postgres: "),
    ("timeout", r"^data.train.query: cancelled after 0.5 s \(statement timeout\) on .*; make the query cheaper or raise "
                r"data.train.timeout"),
])
def test_database_errors_are_one_line_with_the_password_masked(postgres, tmp_path, case, expected):
    from postgres_server import _free_port

    settings = {
        "syntax": dict(database=postgres.url(), query="SELEC 1"),
        "missing table": dict(database=postgres.url(), query="SELECT * FROM nope"),
        "wrong password": dict(database=postgres.url(password="not-the-password"), query="SELECT 1"),
        "unreachable host": dict(database=postgres.url(port=_free_port()), query="SELECT 1"),
        "timeout": dict(database=postgres.url(), query="SELECT pg_sleep(5) AS text", timeout=0.5),
    }[case]
    with pytest.raises(UserError, match=expected) as error:
        read_source(SQLSource(**settings), "data.train", tmp_path)
    message = str(error.value)
    assert "\n" not in message and postgres.password not in message and "not-the-password" not in message


def test_a_config_with_the_password_in_env_prepares_and_mixes_with_a_file(postgres, tmp_path, write_config):
    """${PGPASSWORD} from .env; a PostgreSQL source and a JSONL file with other column names in one dataset."""
    from conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    (tmp_path / ".env").write_text(f"PGPASSWORD={postgres.password}\n")
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"q": f"extra {i}", "a": f" yes {i}"} for i in range(40)])
    url = postgres.url(password="${PGPASSWORD}")
    config = load_config(write_config({
        "task": "causal_lm", "model": {"name": str(tmp_path / "tok")}, "env_file": str(tmp_path / ".env"),
        "data": {"train": [{"database": url, "query": "SELECT prompt, completion FROM big ORDER BY id", "max_rows": 100},
                           {"path": str(extra), "fields": {"prompt": "q", "completion": "a"}, "fraction": 0.5}],
                 "eval_fraction": 0, "cache_dir": str(tmp_path / "cache")}}))
    prepared = prepare(config, lambda: tokenizer)
    assert len(prepared.train) == 120 and prepared.data_format == "prompt_completion"
    assert prepared.summary["dropped"] == {"not picked (max_rows/fraction)": BIG_ROWS - 100 + 20}
    assert [f.rows for f in prepared.files] == [BIG_ROWS, 40]
    assert all(postgres.password not in f.source for f in prepared.files)
    decoded = {tokenizer.decode(ids) for ids in prepared.train["input_ids"]}
    assert any("extra" in text for text in decoded) and any("question" in text for text in decoded)
