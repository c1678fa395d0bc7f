"""Backbones and fine-tuned side models, and joint predictions (one backbone pass feeds every
side model a request names; concurrent requests are micro-batched)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.errors import APIError, require_id
from api.inference import InferenceError
from api.schemas import (
    DeletedModel,
    ModelList,
    ModelObject,
    PredictionObject,
    PredictRequest,
    PredictResponse,
)
from api.serving import ModelNotFound, ModelRegistry, ModelUnavailable, Overloaded
from api.state import Services, services

router = APIRouter(prefix="/v1")


@router.get("/models", response_model=ModelList)
def list_models(s: Services = Depends(services)) -> ModelList:
    registry: ModelRegistry = s.registry
    data = [
        ModelObject(id=b, created=0, owned_by="ladder", kind="backbone", backbone=b)
        for b in registry.available_backbones()
    ]
    data += [_side_model(m) for m in s.db.list_models()]
    return ModelList(data=data)


def _side_model(record: dict) -> ModelObject:
    """A side model with its job, its training file and the figures of its job's result."""
    result = record["result"] or {}
    return ModelObject(
        id=record["id"],
        created=record["created"],
        owned_by="user",
        kind="side",
        backbone=record["backbone"],
        job_id=record["job_id"],
        training_file=record["training_file"],
        training_filename=record["training_filename"],
        test_accuracy=result.get("test_accuracy"),
        test_macro_f1=result.get("test_macro_f1"),
        task=result.get("task", "classify") if result else None,
        test_exact_match=result.get("test_exact_match"),
        warning=result.get("warning"),
    )


@router.delete("/models/{model_id}", response_model=DeletedModel)
def delete_model(model_id: str, s: Services = Depends(services)) -> DeletedModel:
    require_id(model_id, "model_id")
    if model_id in s.registry.available_backbones():
        raise APIError(
            400,
            "model_not_deletable",
            f"{model_id} is a backbone; only fine-tuned side models can be deleted",
            "model_id",
        )
    record = s.db.get_model(model_id)
    if record is None:
        raise APIError(404, "model_not_found", f"no model with id {model_id!r}", "model_id")
    s.db.delete_model(model_id)
    s.registry.forget(model_id)
    s.runner.delete_model_files(record["path"])
    return DeletedModel(id=model_id, deleted=True)


@router.post("/predict", response_model=PredictResponse)
async def predict(body: PredictRequest, s: Services = Depends(services)) -> PredictResponse:
    ids = [body.model] if isinstance(body.model, str) else body.model
    for model_id in ids:
        require_id(model_id, "model")
    texts, pairs = body.texts_and_pairs()
    try:
        results = await s.batcher.predict(ids, texts, pairs)
    except ModelNotFound as exc:
        raise APIError(
            404,
            "model_not_found",
            f"no fine-tuned model with id {exc.args[0]!r}; list them with GET /v1/models",
            "model",
        ) from None
    except ModelUnavailable as exc:
        raise APIError(500, "model_unavailable", str(exc), "model") from None
    except Overloaded as exc:
        raise APIError(503, "overloaded", str(exc)) from None
    except InferenceError as exc:
        raise APIError(400, "invalid_request_error", str(exc), "inputs") from None
    except ValueError as exc:
        raise APIError(400, "invalid_request_error", str(exc), "model") from None
    as_objects = [[PredictionObject(label=p.label, scores=p.scores) for p in r] for r in results]
    if isinstance(body.model, str):
        return PredictResponse(model=body.model, predictions=as_objects[0])
    return PredictResponse(models=ids, predictions=as_objects)
