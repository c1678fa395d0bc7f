"""Uploaded files through FastAPI's test client: the cap on classes, replies that stay small
whatever a file holds, and the files list's cursor paging (the Python client follows it)."""

from __future__ import annotations

import csv

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.client import LadderClient


@pytest.fixture
def client(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.setenv("LADDER_BACKBONES", f"tiny={tiny_bert_dir}")
    monkeypatch.delenv("LADDER_API_KEY", raising=False)
    monkeypatch.delenv("LADDER_MAX_CLASSES", raising=False)
    with TestClient(create_app(home=tmp_path / "home", executor="thread", preload=[])) as c:
        yield c


def upload(client, path, labels: list[str]):
    """A CSV with one row per label (and at least 12 rows), uploaded."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for k in range(max(len(labels), 12)):
            writer.writerow([f"row number {k}", labels[k % len(labels)]])
    with open(path, "rb") as handle:
        return client.post(
            "/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": (path.name, handle, "text/csv")},
        )


def test_more_classes_than_the_cap_are_refused_with_the_cap(client, tmp_path, monkeypatch):
    labels = [f"class-{k:04d}" for k in range(1001)]
    response = upload(client, tmp_path / "many.csv", labels)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_file" and error["param"] == "file"
    # Validation stops at the first label past the cap, so the count is "more than" it.
    assert "more than 1,000 distinct labels" in error["message"]
    assert "LADDER_MAX_CLASSES" in error["message"]
    assert not list((tmp_path / "home" / "files").iterdir())
    monkeypatch.setenv("LADDER_MAX_CLASSES", "1001")
    assert upload(client, tmp_path / "many.csv", labels).status_code == 200


def test_a_file_object_lists_at_most_100_labels_and_counts_them_all(client, tmp_path):
    labels = [f"class-{k:03d}" for k in range(300)]
    file_id = upload(client, tmp_path / "wide.csv", labels).json()["id"]
    for record in (
        client.get(f"/v1/files/{file_id}").json(),
        client.get("/v1/files").json()["data"][0],
    ):
        assert record["n_labels"] == 300
        assert record["labels"] == sorted(labels)[:100]


def test_a_file_object_lists_at_most_10000_characters_of_labels(client, tmp_path):
    labels = [f"{k:02d}" + "x" * 998 for k in range(20)]  # 1,000 characters each
    record = upload(client, tmp_path / "long.csv", labels).json()
    assert record["n_labels"] == 20
    assert record["labels"] == sorted(labels)[:10]


def test_the_files_list_pages_newest_first_with_after_and_limit(client, tmp_path):
    ids = [upload(client, tmp_path / f"f{k}.csv", ["neg", "pos"]).json()["id"] for k in range(5)]
    newest_first = ids[::-1]
    pages, after = [], None
    while True:
        page = client.get("/v1/files", params={"limit": 2, **({"after": after} if after else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        pages.append([f["id"] for f in body["data"]])
        if not body["has_more"]:
            break
        after = body["data"][-1]["id"]
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    assert client.get("/v1/files").json()["has_more"] is False
    assert client.get("/v1/files", params={"limit": 101}).status_code == 400
    python_client = LadderClient("http://testserver", http=client)
    assert [f["id"] for f in python_client.list_files(page_size=2)] == newest_first
