"""``tunelab deploy k8s``: a Dockerfile, a Deployment + Service and a KServe InferenceService.

The model directory is copied into the image (``/models/NAME``); every manifest probes
``/health`` on the serving port.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tunelab.errors import TunelabError

DOCKERFILE = """\
# Build from the directory holding this file and the model: docker build -t {image} .
FROM python:3.11-slim
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/{torch_index} \\
 && pip install --no-cache-dir "tunelab[serve]"
COPY model /models/{name}
EXPOSE {port}
CMD ["tunelab", "serve", "--model", "/models/{name}", "--served-model-name", "{served}", \\
     "--host", "0.0.0.0", "--port", "{port}"]
"""


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:50].strip("-")
    if not slug:
        raise TunelabError(f"cannot make a Kubernetes name from {text!r}: pass --name.")
    return slug


def _probe(port: int, initial: int) -> dict:
    return {
        "httpGet": {"path": "/health", "port": port},
        "initialDelaySeconds": initial,
        "periodSeconds": 10,
        "failureThreshold": 6,
    }


def _container(name: str, image: str, served: str, port: int, gpus: int) -> dict:
    resources = {"limits": {"nvidia.com/gpu": gpus}} if gpus else {}
    return {
        "name": name,
        "image": image,
        "args": [
            "tunelab",
            "serve",
            "--model",
            f"/models/{name}",
            "--served-model-name",
            served,
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
        ],
        "ports": [{"containerPort": port, "name": "http", "protocol": "TCP"}],
        "readinessProbe": _probe(port, 10),
        "livenessProbe": _probe(port, 60),
        "resources": resources,
    }


def manifests(name: str, image: str, served: str, port: int, gpus: int) -> dict[str, list]:
    """The YAML documents of each manifest file."""
    labels = {"app": name}
    container = _container(name, image, served, port, gpus)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": port, "targetPort": port}]},
    }
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"predictor": {"containers": [{**container, "name": "kserve-container"}]}},
    }
    return {"deployment.yaml": [deployment, service], "inferenceservice.yaml": [isvc]}


def write_k8s(
    model: str,
    out: Path,
    name: str | None = None,
    port: int = 8000,
    image: str | None = None,
    gpus: int = 0,
    served_model_name: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the Dockerfile and manifests into ``out``; return the files written."""
    name = _slug(name or Path(str(model).rstrip("/")).name or str(model))
    served = served_model_name or name
    image = image or f"tunelab-serve-{name}:latest"
    files = {
        "Dockerfile": DOCKERFILE.format(
            image=image,
            name=name,
            served=served,
            port=port,
            torch_index="cu124" if gpus else "cpu",
        ),
        **{
            fname: yaml.safe_dump_all(docs, sort_keys=False)
            for fname, docs in manifests(name, image, served, port, gpus).items()
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    clash = [f for f in files if (out / f).exists()]
    if clash and not overwrite:
        raise TunelabError(f"{out} already holds {', '.join(clash)}: pass --overwrite.")
    written = []
    for fname, text in files.items():
        (out / fname).write_text(text)
        written.append(out / fname)
    note = (
        f"Copy the model directory to {out}/model before `docker build`:\n"
        f"  cp -r <model dir of {model}> {out}/model\n"
    )
    (out / "README.txt").write_text(note)
    return [*written, out / "README.txt"]
