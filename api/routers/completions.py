"""OpenAI-compatible generation: `POST /v1/chat/completions` and `POST /v1/completions`, for
generative side models (by id) and bare backbones (by name), streamed as server-sent events in
OpenAI's chunk format or answered whole. Requests share decode steps (api/gen_service.py)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from api.errors import APIError, require_id
from api.gen_service import GenerationService, Overloaded
from api.serving import ClassifierModel, ModelNotFound, ModelUnavailable
from api.state import Services, services
from side_trainer.decoding import Sampling

router = APIRouter(prefix="/v1")

MAX_TOKENS = 4096  # a request's ceiling on new tokens
DEFAULT_MAX_TOKENS = 256


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, Field(max_length=1_000_000)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's other fields: accepted, unused
    model: Annotated[str, Field(min_length=1, max_length=128)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: write max_tokens tokens (benchmarks)


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None


class CompletionRequest(_Common):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


def _sampling(body: _Common) -> Sampling:
    if body.n not in (None, 1):
        raise APIError(400, "invalid_request_error", "n must be 1: one choice per request", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "invalid_request_error", "a stop string is empty", "stop")
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    return Sampling(
        max_tokens=limit or DEFAULT_MAX_TOKENS,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(stop),
        ignore_end=body.ignore_eos,
    )


def _target(s: Services, model: str) -> tuple[str, str | None, str | None]:
    """(backbone name, side model id or None, the side model's template) of a model field."""
    require_id(model, "model")
    if model in s.registry.available_backbones():
        _check_decoder(model)
        return model, None, None
    record = s.db.get_model(model)
    if record is None:
        raise APIError(
            404,
            "model_not_found",
            f"no model {model!r}: pass a generative fine-tuned model's id or a backbone name "
            f"(GET /v1/models lists them)",
            "model",
        )
    try:
        net = s.registry.side(model, task="generate")
    except ClassifierModel as exc:
        raise APIError(400, "invalid_request_error", str(exc), "model") from None
    except ModelNotFound:
        raise APIError(404, "model_not_found", f"no model {model!r}", "model") from None
    except ModelUnavailable as exc:
        raise APIError(500, "model_unavailable", str(exc), "model") from None
    _check_decoder(record["backbone"])
    return record["backbone"], model, net.cfg.template


def _check_decoder(backbone: str) -> None:
    from backbone_worker.backbone import backbone_config
    from backbone_worker.families import DECODER

    _, family = backbone_config(backbone)
    if family.name != DECODER:
        raise APIError(
            400,
            "invalid_model",
            f"{backbone!r} is {family.name}: these endpoints serve decoder-only backbones and "
            f"their side models (a T5 side model writes with `ladder generate`)",
            "model",
        )


def _prompt(s: Services, backbone: str, body, template: str | None) -> list[int]:
    from backbone_worker.chat import TemplateError, prompt_ids
    from backbone_worker.gen_cache import prompt_of
    from side_trainer.gen_eval import prompt_tokens

    tokenizer = s.registry.backbone(backbone).tokenizer
    try:
        if isinstance(body, ChatRequest):
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.content}
                for m in body.messages
            ]
            if messages[-1]["role"] == "assistant":
                raise APIError(
                    400,
                    "invalid_request_error",
                    "the last message is the assistant's; end with a user message",
                    "messages",
                )
            return prompt_ids(tokenizer, messages)
        text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        if template is None and not getattr(tokenizer, "chat_template", None):
            template = "plain"  # a base model continues its prompt
        return prompt_tokens(s.registry.backbone(backbone), prompt_of(text, template))
    except TemplateError as exc:
        raise APIError(400, "invalid_request_error", str(exc), "model") from None


class _Text:
    """A generation's text as deltas: decoded so far, less what was sent, holding back an
    incomplete character and a tail that could begin a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(text)
        if text.endswith("\ufffd"):  # a character whose bytes are not all here yet
            end -= 1
        if self.stop:
            end = min(end, len(text) - max(len(s) for s in self.stop) + 1)
        delta = text[self.sent : max(end, self.sent)]
        self.sent += len(delta)
        return delta

    def rest(self, final: str) -> str:
        """What is left to send of the finished generation's text (cut at a stop string)."""
        return final[self.sent :] if len(final) > self.sent else ""


async def _generate(s: Services, body, chat: bool, request: Request):
    service: GenerationService = s.generator
    sampling = _sampling(body)
    # Loading a backbone or a side model reads files: off the event loop.
    backbone, model, template = await asyncio.to_thread(_target, s, body.model)
    prompt = await asyncio.to_thread(_prompt, s, backbone, body, template)
    try:
        job = service.submit(backbone, model, prompt, sampling)
    except Overloaded as exc:
        raise APIError(429, "rate_limit_exceeded", str(exc)) from None
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    tokenizer = s.registry.backbone(backbone).tokenizer
    if body.stream:
        return StreamingResponse(
            _stream(service, job, body, chat, ident, created, tokenizer, request),
            media_type="text/event-stream",
        )
    try:
        generation = await _result(job)
    except BaseException:
        service.cancel(job)
        raise
    usage = _usage(len(prompt), len(generation.token_ids))
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": generation.text},
            "finish_reason": generation.finish_reason,
            "logprobs": None,
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": generation.text,
            "finish_reason": generation.finish_reason,
            "logprobs": None,
        }
        kind = "text_completion"
    return {
        "id": ident,
        "object": kind,
        "created": created,
        "model": body.model,
        "choices": [choice],
        "usage": usage,
    }


def _usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _result(job):
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise APIError(500, "generation_failed", f"generation failed: {value}")


async def _stream(service, job, body, chat, ident, created, tokenizer, request):
    kind = "chat.completion.chunk" if chat else "text_completion"
    text = _Text(tokenizer, tuple(job.sampling.stop))

    def chunk(delta: str | None, finish: str | None = None, first: bool = False) -> str:
        if chat:
            choice = {"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None}
            if first:
                choice["delta"]["role"] = "assistant"
            if delta is not None:
                choice["delta"]["content"] = delta
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body_ = {"id": ident, "object": kind, "created": created, "model": body.model,
                 "choices": [choice]}  # fmt: skip
        return f"data: {json.dumps(body_)}\n\n"

    try:
        if chat:
            yield chunk("", first=True)
        while True:
            event, value = await job.events.get()
            if event == "token":
                delta = text.add(value)
                if delta:
                    yield chunk(delta)
            elif event == "done":
                rest = text.rest(value.text)
                if rest:
                    yield chunk(rest)
                yield chunk(None, value.finish_reason)
                if body.stream_options and body.stream_options.include_usage:
                    usage = _usage(len(job.prompt), len(value.token_ids))
                    yield (
                        "data: "
                        + json.dumps(
                            {
                                "id": ident,
                                "object": kind,
                                "created": created,
                                "model": body.model,
                                "choices": [],
                                "usage": usage,
                            }  # fmt: skip
                        )
                        + "\n\n"
                    )
                break
            elif event == "error":
                error = {"error": {"code": "generation_failed", "message": str(value),
                                   "param": None, "type": "server_error"}}  # fmt: skip
                yield f"data: {json.dumps(error)}\n\n"
                break
            else:  # cancelled
                break
        yield "data: [DONE]\n\n"
    finally:
        service.cancel(job)  # a client gone mid-stream frees its row at the next step


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, s: Services = Depends(services)):
    return await _generate(s, body, True, request)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, s: Services = Depends(services)):
    return await _generate(s, body, False, request)
