"""Continuous batching (side_trainer/continuous.py): requests joining and leaving a running batch
get, token for token, what each gets decoded alone."""

from __future__ import annotations

from test_generation import PROMPTS, backbone, head_of, make_net  # noqa: F401

from side_trainer.continuous import ContinuousDecoder, Request
from side_trainer.decoding import Decoder, Sampling


def alone(backbone, head, net, prompt, sampling):  # noqa: F811
    return Decoder(backbone, head, [net], []).generate([prompt], sampling)[0]


def test_requests_joining_and_leaving_a_running_batch_write_what_they_write_alone(backbone):  # noqa: F811
    head = head_of(backbone)
    nets = {"a": make_net(backbone, seed=1), "b": make_net(backbone, seed=2, layers=(1, 2))}
    decoder = ContinuousDecoder(backbone, head, {}, end_ids=[])
    plan = [  # (step it joins at, prompt, network, max_tokens)
        (0, PROMPTS[0], "a", 7),
        (0, PROMPTS[1], None, 3),
        (2, PROMPTS[2], "b", 6),
        (3, [101, 2023, 2003, 1037, 3231, 2054, 2003, 1037], "a", 4),  # longer than the batch
        (5, PROMPTS[1], "b", 5),
    ]
    requests, step = [], 0
    while step < 20:
        for at, prompt, key, n in plan:
            if at == step:
                request = Request(prompt, key, Sampling(max_tokens=n))
                requests.append(request)
                decoder.add(request, nets.get(key))  # as the server does: each with its net
        decoder.step()
        step += 1
    assert decoder.active == 0 and len(requests) == len(plan)
    # A side network no request in flight uses is not held by the decoder (the registry's
    # budget decides what stays loaded); the layers it read are no longer caught.
    assert decoder.by_key == {} and decoder.layers == []
    for request, (_, prompt, key, n) in zip(requests, plan):
        expected = alone(backbone, head, nets.get(key), prompt, Sampling(max_tokens=n))
        assert request.generation.token_ids == expected.token_ids, (key, prompt)
        assert request.generation.finish_reason == "length"


def test_a_request_stops_at_its_end_token_and_sampling_follows_its_seed(backbone):  # noqa: F811
    head = head_of(backbone)
    net = make_net(backbone, seed=3)
    free = alone(backbone, head, net, PROMPTS[0], Sampling(max_tokens=6))
    end = free.token_ids[2]
    decoder = ContinuousDecoder(backbone, head, {"a": net}, end_ids=[end])
    seen = []
    stopped = Request(PROMPTS[0], "a", Sampling(max_tokens=6), on_token=lambda r, t: seen.append(t))
    sampled = [
        Request(PROMPTS[1], "a", Sampling(max_tokens=5, temperature=1.0, seed=s)) for s in (7, 7)
    ]
    decoder.add(stopped, net)
    decoder.add(sampled[0], net)
    decoder.step()
    decoder.add(sampled[1], net)
    for _ in range(8):
        decoder.step()
    assert stopped.generation.finish_reason == "stop"
    assert stopped.generation.token_ids == seen == free.token_ids[: free.token_ids.index(end)]
    assert sampled[0].generation.token_ids == sampled[1].generation.token_ids  # one seed, one text
    assert decoder.active == 0
    # A network given with its request joins the decoder for as long as it is used.
    late = Request(PROMPTS[2], "late", Sampling(max_tokens=2))
    decoder.add(late, net)
    assert decoder.by_key == {"late": net} and decoder.layers == sorted(net.cfg.layers)
    decoder.step()
    assert decoder.active == 0 and decoder.by_key == {}
    assert (
        late.generation.token_ids
        == alone(backbone, head, net, PROMPTS[2], late.sampling).token_ids[:2]
    )


def test_a_cancelled_request_leaves_at_the_next_step(backbone):  # noqa: F811
    decoder = ContinuousDecoder(backbone, head_of(backbone), {"a": make_net(backbone)}, [])
    done = []
    r = Request(PROMPTS[0], "a", Sampling(max_tokens=50), on_done=lambda req: done.append(req))
    decoder.add(r)
    decoder.step()
    r.cancelled = True
    decoder.step()
    assert decoder.active == 0 and done == [r] and len(r.generation.token_ids) == 2
