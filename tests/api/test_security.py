"""What a request may name on the server: evaluation datasets stay inside the evaluation data
directory (links resolved), and no answer or run error shows where anything lies on the server.

The Batch API names stored files by id and endpoints from a fixed list; they are checked here
too, against the same traversal and encoding tricks."""

import json
import time
from pathlib import Path

import pytest

from db.queries import evals as eval_queries
from db.session import session_scope
from tests.evals.conftest import EVAL_DATA_ROOT, EVAL_MODEL, GSM8K_TEST, write_jsonl

GSM8K_RUN = {"benchmark": "gsm8k", "model": EVAL_MODEL, "num_fewshot": 0, "limit": 1}
SECRET = {"question": "SECRET-7f3a: the text of a file outside the data folder", "answer": "#### 1"}
# Names that would leave the data folder, or hide a separator, a dot-dot or a NUL from a check.
TRICKY_NAMES = [
    "../gsm8k",
    "gsm8k/../../..",
    "gsm8k/..",
    "./gsm8k",
    "gsm8k/",
    "gsm8k//x",
    "/etc",
    "//etc/passwd",
    "~/data",
    "..\\..\\etc",
    "gsm8k\\..\\..",
    "C:\\data",
    "%2e%2e/%2e%2e/etc",
    "gsm8k%2F..%2F..",
    "%252e%252e",
    "gsm8k\x00",
    "gsm8k/\x00/x",
    "gsm8k\n",
    "\uff0e\uff0e/etc",  # fullwidth full stops
    "gsm8k\uff0f..",  # fullwidth solidus
    "\u2025/etc",  # two dot leader
    "\uff47\uff53\uff4d\uff18\uff4b",  # fullwidth gsm8k, the same as gsm8k once NFKC-normalized
    ".hidden",
    "",
]


def server_paths() -> list[str]:
    """Paths that must never appear in an answer: the data folder and the working directory."""
    return [str(EVAL_DATA_ROOT), str(EVAL_DATA_ROOT.resolve()), str(Path.cwd())]


def assert_refused(response, *phrases: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "dataset"
    for phrase in phrases:
        assert phrase in error["message"]
    for path in server_paths():
        assert path not in error["message"]
    return error["message"]


def write_gsm8k(folder: Path, test: list[dict] = GSM8K_TEST) -> Path:
    write_jsonl(folder / "train.jsonl", GSM8K_TEST)
    write_jsonl(folder / "test.jsonl", test)
    return folder


def wait_until_planned(client, run_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (run := client.get(f"/v1/evals/{run_id}").json())["status"] == "queued":
        assert time.monotonic() < deadline, run
        time.sleep(0.1)
    return run


@pytest.fixture(autouse=True)
def data_folder() -> Path:
    EVAL_DATA_ROOT.mkdir(parents=True, exist_ok=True)
    return EVAL_DATA_ROOT


@pytest.fixture
def outside(tmp_path, monkeypatch) -> Path:
    """A GSM8K folder `leak/gsm` outside the data folder, in the working directory."""
    write_gsm8k(tmp_path / "leak" / "gsm", [SECRET])
    monkeypatch.chdir(tmp_path)
    return tmp_path / "leak" / "gsm"


def test_create_run_with_a_folder_outside_the_data_folder_is_refused(client, outside):
    response = client.post("/v1/evals", json={**GSM8K_RUN, "dataset": "leak/gsm"})
    message = assert_refused(
        response, "dataset 'leak/gsm' is not a folder in the evaluation data directory"
    )
    assert str(outside) not in message


@pytest.mark.parametrize("name", TRICKY_NAMES)
def test_create_run_with_a_tricky_dataset_name_is_refused(client, name):
    response = client.post("/v1/evals", json={**GSM8K_RUN, "dataset": name})
    assert_refused(response, f"dataset {name!r} is not a folder name")


def test_create_run_with_another_hub_dataset_is_refused(client):
    for name, benchmark in (("someone/gsm8k", "gsm8k"), ("cais/mmlu", "gsm8k")):
        response = client.post(
            "/v1/evals", json={**GSM8K_RUN, "benchmark": benchmark, "dataset": name}
        )
        assert_refused(response, f"dataset {name!r} is not a folder", "nor openai/gsm8k")


def test_create_run_with_a_link_out_of_the_data_folder_is_refused(client, tmp_path):
    elsewhere = write_gsm8k(tmp_path / "elsewhere", [SECRET])
    (EVAL_DATA_ROOT / "sec-folder-link").symlink_to(elsewhere, target_is_directory=True)
    response = client.post("/v1/evals", json={**GSM8K_RUN, "dataset": "sec-folder-link"})
    assert_refused(response, "dataset 'sec-folder-link' leads outside the evaluation data")

    inside = write_gsm8k(EVAL_DATA_ROOT / "sec-file-link")
    (inside / "test.jsonl").unlink()
    (inside / "test.jsonl").symlink_to(elsewhere / "test.jsonl")
    response = client.post("/v1/evals", json={**GSM8K_RUN, "dataset": "sec-file-link"})
    assert_refused(response, "GSM8K file sec-file-link/test.jsonl leads outside the evaluation")

    mmlu = EVAL_DATA_ROOT / "sec-subfolder-link"
    (mmlu / "test").mkdir(parents=True)
    (mmlu / "test" / "anatomy_test.csv").write_text("q,a,b,c,d,A\n")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d,A\n")
    (mmlu / "dev").symlink_to(tmp_path / "dev", target_is_directory=True)
    body = {**GSM8K_RUN, "benchmark": "mmlu", "subjects": ["anatomy"], "dataset": mmlu.name}
    response = client.post("/v1/evals", json=body)
    assert_refused(response, "MMLU file sec-subfolder-link/dev/anatomy_dev.csv leads outside")


def test_create_run_keeps_the_folder_name_not_its_server_path(client):
    real = write_gsm8k(EVAL_DATA_ROOT / "sec-real")
    (EVAL_DATA_ROOT / "sec-alias").symlink_to(real, target_is_directory=True)
    for name in ("sec-real", "sec-alias"):  # a link that stays inside the folder is fine
        response = client.post("/v1/evals", json={**GSM8K_RUN, "dataset": name})
        assert response.status_code == 202, response.text
        run = response.json()
        assert run["dataset"] == name
        assert client.get(f"/v1/evals/{run['id']}").json()["dataset"] == name


def test_create_run_with_a_file_missing_is_refused(client):
    folder = write_gsm8k(EVAL_DATA_ROOT / "sec-half")
    (folder / "test.jsonl").unlink()
    response = client.post("/v1/evals", json={**GSM8K_RUN, "dataset": "sec-half"})
    assert_refused(
        response, "GSM8K files not found in the evaluation data directory: sec-half/test.jsonl"
    )


def test_run_with_a_bad_record_fails_naming_the_file_inside_the_data_folder(client):
    write_gsm8k(EVAL_DATA_ROOT / "sec-bad-record", [{"question": "no answer"}])
    response = client.post("/v1/evals", json={**GSM8K_RUN, "dataset": "sec-bad-record"})
    assert response.status_code == 202, response.text
    run = wait_until_planned(client, response.json()["id"])
    assert run["status"] == "failed"
    assert run["error"].startswith("sec-bad-record/test.jsonl:1 is not a GSM8K record")
    for path in server_paths():
        assert path not in run["error"]


@pytest.mark.parametrize("stored", ["leak/gsm", "absolute"])
def test_run_stored_with_a_folder_outside_the_data_folder_fails_unread(
    client, database_url, outside, stored
):
    """A run stored before the API checked its dataset: the driver checks it again."""
    dataset = str(outside) if stored == "absolute" else stored
    with session_scope(database_url) as session:
        run_id = eval_queries.create_run(
            session, eval_queries.NewRun("gsm8k", EVAL_MODEL, 0, 1, None, dataset)
        ).id
    run = wait_until_planned(client, str(run_id))
    assert run["status"] == "failed"
    assert run["error"].startswith(f"dataset {dataset!r} is not a folder")
    items = client.get(f"/v1/evals/{run_id}/items").json()
    assert items["total"] == 0
    assert SECRET["question"] not in str(items)


@pytest.mark.parametrize(
    "file_id", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "..\\..\\etc", "file-%00", "%C0%AE%C0%AE"]
)
def test_read_file_content_with_a_path_for_an_id_is_refused(client, file_id):
    """Files live in Postgres and are looked up by id: a path in the id reaches no disk."""
    response = client.get(f"/v1/files/{file_id}/content")
    assert response.status_code in (400, 404), response.text
    assert "root:" not in response.text
    for path in server_paths():
        assert path not in response.text


def test_create_batch_with_lines_for_another_url_fails_validation(client):
    """A line's url must be the batch's endpoint exactly: no dot-dot, escape or other host."""
    lines = [
        {"custom_id": f"c{n}", "method": "POST", "url": url, "body": {"model": "tiny-llama"}}
        for n, url in enumerate(
            [
                "/v1/completions/../admin/keys",
                "/v1/completions%2F..%2Fadmin",
                "/v1/../v1/completions",
                "http://127.0.0.1:8000/v1/completions",
                "/v1/completions\x00",
            ]
        )
    ]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = client.post(
        "/v1/files", files={"file": ("../../x.jsonl", content)}, data={"purpose": "batch"}
    ).json()
    batch = client.post(
        "/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions"}
    ).json()
    deadline = time.monotonic() + 30
    while batch["status"] == "validating":
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = client.get(f"/v1/batches/{batch['id']}").json()
    assert batch["status"] == "failed"
    codes = {error["code"] for error in batch["errors"]["data"]}
    assert codes == {"invalid_url"}
    assert len(batch["errors"]["data"]) == len(lines)
