"""Request and response bodies of the HTTP service (shapes of the OpenAI fine-tuning API)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.hyperparameters import Hyperparameters


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    rows: int
    # The classes, sorted: every one when few and short, else the first ones (a reply stays
    # small whatever the file holds); n_labels counts them all.
    labels: list[str]
    n_labels: int
    # "classification" (text, label) or "generation" (chats or prompt/completion pairs: no
    # labels), and for generation the rows' kind: chat, completion or mixed.
    task: Literal["classification", "generation"] = "classification"
    kind: str | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(default=None, max_length=128)
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    suffix: Annotated[str, Field(max_length=40, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class HyperparameterObject(BaseModel):
    name: str
    description: str
    value: Any  # what "auto" resolves to for the backbone and the upload
    sweep: bool  # a list of values trains one configuration per value
    choices: list[Any] | None = None


class HyperparameterList(BaseModel):
    object: Literal["list"] = "list"
    model: str
    training_file: str
    data: list[HyperparameterObject]


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None = None
    status: Literal[
        "validating_files", "queued", "caching", "training", "succeeded", "failed", "cancelled"
    ]
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    fine_tuned_model: str | None = None
    error: JobError | None = None
    result: dict[str, Any] | None = None
    seed: int | None = None
    suffix: str | None = None


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] = {}


class ModelWarning(BaseModel):
    code: str
    message: str


class ModelObject(BaseModel):
    """OpenAI's model object; a side model adds where it came from and how it scored on its
    file's test split (its job's result; null for a backbone, or where that job is gone)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["backbone", "side"]
    backbone: str
    job_id: str | None = None
    training_file: str | None = None
    training_filename: str | None = None
    test_accuracy: float | None = None
    test_macro_f1: float | None = None
    # "classify" or "generate" (a side model that writes); generative models report exact match.
    task: Literal["classify", "generate"] | None = None
    test_exact_match: float | None = None
    # Still no better than predicting the majority class after training's retries.
    warning: ModelWarning | None = None


class DeletedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class DeletedFile(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
    has_more: bool = False


Text = Annotated[str, Field(max_length=10000)]


class TextPair(BaseModel):
    """One input of a model trained on text pairs (uploads with a text_pair column)."""

    model_config = ConfigDict(extra="forbid")
    text: Text
    text_pair: Text


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: (
        Annotated[str, Field(min_length=1, max_length=128)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=128)]],
            Field(min_length=1, max_length=16),
        ]
    )
    inputs: Annotated[list[Text | TextPair], Field(min_length=1, max_length=256)]

    @field_validator("inputs")
    @classmethod
    def no_empty_text(cls, inputs: list) -> list:
        if len({isinstance(x, TextPair) for x in inputs}) > 1:
            raise ValueError("mixes plain texts and text pairs; send one kind per request")
        for k, item in enumerate(inputs):
            texts = [item.text, item.text_pair] if isinstance(item, TextPair) else [item]
            if any(not t.strip() for t in texts):
                raise ValueError(f"inputs[{k}] is empty; send non-empty texts")
        return inputs

    def texts_and_pairs(self) -> tuple[list[str], list[str] | None]:
        if isinstance(self.inputs[0], TextPair):
            return [x.text for x in self.inputs], [x.text_pair for x in self.inputs]
        return list(self.inputs), None


class PredictionObject(BaseModel):
    label: str
    scores: dict[str, float]


class PredictResponse(BaseModel):
    model: str | None = None
    models: list[str] | None = None
    predictions: list[PredictionObject] | list[list[PredictionObject]]
