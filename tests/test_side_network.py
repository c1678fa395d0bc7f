"""The side network and its pruning init, on tiny random backbones of each family."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backbone_worker.backbone import load_backbone
from backbone_worker.families import FamilyError
from backbone_worker.importance import block_parameters, fisher_scores, fit_probe, magnitude_scores
from side_trainer.model import SideConfig, SideNetwork
from side_trainer.pruning import apply_pruning_init, load_lm_head

TEXTS = ["a fine day", "terrible news again today", "ok", "what a lovely surprise it was"]
LABELS = ["neg", "pos", "neg", "pos"]
LAYERS = [0, 2]


def side_config(backbone, reduction=4, layers=LAYERS) -> SideConfig:
    return SideConfig(
        family=backbone.family.name,
        backbone=str(backbone.path),
        backbone_fingerprint=backbone.fingerprint,
        backbone_config=backbone.config.to_dict(),
        layers=layers,
        labels=["neg", "pos"],
        reduction=reduction,
        label_texts=["neg", "pos"],
    )


def make_batch(backbone, layers=LAYERS):
    enc = backbone.tokenize(TEXTS, None, 32)
    dec = backbone.tokenize_targets(LABELS) if backbone.family.name == "encoder-decoder" else None
    states = backbone.ladder_states(layers, enc, dec)
    # States from inference mode are read-only constants, as they are when read from the store.
    clone = {s: {k: v.clone() for k, v in d.items()} for s, d in states.items()}
    batch = {
        "enc": {"states": clone["enc"], "attention_mask": enc["attention_mask"]},
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    if dec is not None:
        batch["dec"] = {
            "states": clone["dec"],
            "attention_mask": dec["attention_mask"],
            "input_ids": dec["input_ids"],
        }
    return batch


PROBE_TEXTS = ["good", "bad stuff", "very good indeed", "so bad"]


def probe_for(backbone):
    if backbone.family.name == "encoder-decoder":
        return None
    return fit_probe(backbone, PROBE_TEXTS, None, ["pos", "neg", "pos", "neg"], ["neg", "pos"], 32)


def scores_for(backbone, layers=LAYERS):
    scores = fisher_scores(
        backbone, layers, TEXTS, None, LABELS, ["neg", "pos"], 32, probe=probe_for(backbone)
    )
    scores.update(magnitude_scores(backbone, layers))
    return scores


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    return load_backbone(tiny_backbone_dir)


def test_batched_fisher_equals_the_batch_size_1_sums(backbone):
    """The empirical Fisher as the reference computes it: one example at a time, the squared
    gradient of its own loss, summed; here by plain autograd, against the batched hooks."""
    import torch.nn.functional as F

    probe = probe_for(backbone)
    params = block_parameters(backbone, LAYERS)
    expected = {key: torch.zeros_like(p) for key, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for text, label in zip(TEXTS, LABELS):
        enc = backbone.tokenize([text], None, 32)
        if probe is None:
            loss = backbone.run(enc, backbone.tokenize_targets([label])).loss
        else:
            hidden = backbone.run(enc).last_hidden_state
            pooled = hidden[:, -1] if backbone.family.name == "decoder" else hidden.mean(1)
            loss = F.cross_entropy(probe(pooled), torch.tensor([["neg", "pos"].index(label)]))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for key, grad in zip(params, grads):
            if grad is not None:
                expected[key] += grad**2
    for p in params.values():
        p.requires_grad_(False)
    got = fisher_scores(
        backbone, LAYERS, TEXTS, None, LABELS, ["neg", "pos"], 32, probe=probe, batch_size=3
    )
    checked = 0
    for key, square in expected.items():
        if "relative_attention_bias" in key:  # shared by the batch: not scored, kept whole
            assert f"fisher/{key}/row" not in got
            continue
        rows = square.sum(1) if square.dim() == 2 else square
        torch.testing.assert_close(got[f"fisher/{key}/row"], rows, rtol=1e-4, atol=1e-12)
        if square.dim() == 2:
            torch.testing.assert_close(
                got[f"fisher/{key}/col"], square.sum(0), rtol=1e-4, atol=1e-12
            )
        checked += 1
    assert checked >= 10 and any(v.sum() > 0 for v in got.values())


def test_fisher_and_its_probe_use_disjoint_training_examples():
    from backbone_worker.cache import PROBE_EXAMPLES, fisher_slices

    scored, probed = fisher_slices(5000, 1024, needs_probe=True)
    assert (scored.start, scored.stop) == (0, 1024) and probed.stop - probed.start == PROBE_EXAMPLES
    for n in (10, 300, 960, 1500):
        scored, probed = fisher_slices(n, 1024, needs_probe=True)
        assert scored.stop <= probed.start and probed.stop == n and scored.stop > 0
        assert probed.stop - probed.start == min(PROBE_EXAMPLES, n // 2)
    assert fisher_slices(300, 1024, needs_probe=False) == (slice(0, 300), slice(300, 300))


def test_the_fisher_probe_is_the_same_whatever_the_random_state():
    """Two `ladder cache` runs of one command must score the backbone alike: the probe that
    the Fisher scores go through does not depend on the global random state."""
    from backbone_worker.importance import train_probe

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 16, generator=generator)
    targets = (features[:, 0] + 0.5 * torch.randn(64, generator=generator) > 0).long()
    probes = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        probes.append(train_probe(features, targets, 2))
    assert torch.equal(probes[0].weight, probes[1].weight)
    assert torch.equal(probes[0].bias, probes[1].bias)
    assert probes[0].weight.abs().sum() > 0  # it was fitted


def test_side_network_trains_for_every_family(backbone):
    net = SideNetwork(side_config(backbone))
    apply_pruning_init(net, backbone.path, scores_for(backbone), "fisher")
    if backbone.family.name == "encoder-decoder":
        load_lm_head(net, backbone.path)
    batch = make_batch(backbone)

    def eval_loss():
        net.eval()
        with torch.no_grad():
            return net.loss(batch, net(batch)).item()

    first = eval_loss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(60):
        net.train()
        loss = net.loss(batch, net(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < 0.7 * first  # it learns to fit four examples
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    assert net.trainable_parameters() < 0.25 * backbone_params


def test_gradients_never_reach_backbone(backbone):
    net = SideNetwork(side_config(backbone))
    if backbone.family.name == "encoder-decoder":
        load_lm_head(net, backbone.path)
    batch = make_batch(backbone)
    net.loss(batch, net(batch)).backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.model.parameters())
    backbone_storage = {p.data_ptr() for p in backbone.model.parameters()}
    assert not any(p.data_ptr() in backbone_storage for p in net.parameters())
    assert all(p.grad is not None for p in net.streams["enc"].ladders.parameters())


def test_gate_mixes_ladder_state_as_the_paper_says(tiny_bert_dir, monkeypatch):
    import side_trainer.model as model

    backbone = load_backbone(tiny_bert_dir)
    net = SideNetwork(side_config(backbone))
    stack = net.streams["enc"]
    assert torch.allclose(stack.gates(), torch.full((2,), 0.5))  # alpha = 0 -> mu = 0.5
    with torch.no_grad():
        stack.gate_alpha.copy_(torch.tensor([0.3, -0.2]))
    seen = {}
    block = model.bert_block  # encoder side blocks run packed: what enters the first one

    def spy(b, x, packing, bias):
        if b is stack.blocks[0]:
            seen["h"] = packing.pad(x)
        return block(b, x, packing, bias)

    monkeypatch.setattr(model, "bert_block", spy)
    batch = make_batch(backbone)
    net(batch)
    states = batch["enc"]["states"]
    mu = 1 / (1 + torch.exp(torch.tensor(-0.3 / 0.1)))  # sigmoid(alpha / T), T = 0.1
    emb = states["emb"] @ stack.ladders["emb"].weight.T + stack.ladders["emb"].bias
    ladder = states["layer_0"] @ stack.ladders["layer_0"].weight.T + stack.ladders["layer_0"].bias
    real = batch["enc"]["attention_mask"].bool()
    assert not real.all()  # the batch has padding, which the packed stream skips
    assert torch.allclose(seen["h"][real], (mu * emb + (1 - mu) * ladder)[real], atol=1e-6)


def padded_forward(net: SideNetwork, batch: dict) -> torch.Tensor:
    """The encoder side network as it ran before packing: every block transformers' own
    BertLayer on the padded batch."""
    from side_trainer.model import additive_mask

    stack, enc = net.streams["enc"], batch["enc"]
    states, mask = enc["states"], enc["attention_mask"]
    h, mu = stack.ladder("emb", states["emb"]), stack.gates()
    for j, i in enumerate(stack.layers):
        h = torch.lerp(stack.ladder(f"layer_{i}", states[f"layer_{i}"]), h, mu[j])
        out = stack.blocks[j](h, attention_mask=additive_mask(mask, h.dtype))
        h = out[0] if isinstance(out, tuple) else out
    return net.head(stack.final_norm(h), mask)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_packed_encoder_side_network_computes_what_the_padded_one_does(tiny_bert_dir, side):
    """Packed (real tokens only) and padded, the same logits and the same gradients, with the
    padding on either side and attention and hidden dropout off."""
    from side_trainer.packing import pack_batch, worth_packing

    backbone = load_backbone(tiny_bert_dir)
    torch.manual_seed(0)
    net = SideNetwork(side_config(backbone))
    for name, param in net.named_parameters():  # away from the init's near-zero ladders
        if "gate" not in name:
            torch.nn.init.normal_(param, std=0.3)
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # attention's too: BertSelfAttention passes its p to SDPA
    batch = make_batch(backbone)
    mask = batch["enc"]["attention_mask"]
    if side == "left":  # each row's tokens moved to the end
        order = torch.argsort(mask, dim=1, stable=True)
        for name, state in batch["enc"]["states"].items():
            batch["enc"]["states"][name] = state.gather(1, order[..., None].expand_as(state))
        batch["enc"]["attention_mask"] = mask.gather(1, order)
    assert worth_packing("encoder", batch["enc"]["attention_mask"])  # padding to skip

    def grads(logits):
        net.zero_grad()
        logits.square().sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    net.train()
    expected = padded_forward(net, batch)
    expected_grads = grads(expected)
    for packed_by in ("itself", "the caller"):
        inputs = pack_batch(batch, "encoder") if packed_by == "the caller" else batch
        logits = net(inputs)
        assert torch.allclose(logits, expected, atol=1e-5), packed_by
        got = grads(logits)
        assert got.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            assert torch.allclose(got[name], grad, atol=1e-4), (packed_by, name)


def test_packing_round_trips_and_only_encoders_pack_padded_batches(tiny_backbone_dir):
    from side_trainer.packing import MIN_PADDING, Packing, pack_batch

    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    x = torch.randn(3, 3, 5)
    packing = Packing.of(mask)
    packed = packing.pack(x)
    assert packed.shape == (7, 5)
    assert torch.equal(packing.pad(packed), x * mask[..., None])
    backbone = load_backbone(tiny_backbone_dir)
    batch = make_batch(backbone)
    out = pack_batch(batch, backbone.family.name)
    if backbone.family.name != "encoder":
        assert out is batch  # T5 and decoder-only side blocks run padded
        net = SideNetwork(side_config(backbone))
        with pytest.raises(ValueError, match="do not run packed"):
            net(pack_batch(batch, "encoder"))
    else:
        assert out["enc"]["states"]["emb"].shape[0] == int(batch["enc"]["attention_mask"].sum())
        # A batch of texts of nearly one length (as the store's reader cuts them) runs padded.
        mask = batch["enc"]["attention_mask"]
        longest = int(mask.sum(1).max())
        even = {"enc": {**batch["enc"], "attention_mask": torch.ones_like(mask[:, :longest])}}
        even["enc"]["attention_mask"][0, -1] = 0
        assert float(even["enc"]["attention_mask"].float().mean()) > 1 - MIN_PADDING
        assert pack_batch(even, "encoder") is even


def test_a_bert_block_the_packed_forward_does_not_implement_is_refused():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    from side_trainer.model import additive_mask
    from side_trainer.packing import Packing, bert_block

    mask = torch.tensor([[1, 1, 0]])
    packing = Packing.of(mask)
    config = BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16)
    x = torch.randn(2, 8)
    assert bert_block(BertLayer(config), x, packing, additive_mask(mask, x.dtype)).shape == (2, 8)
    config.chunk_size_feed_forward = 1
    with pytest.raises(ValueError, match="run this one padded"):
        bert_block(BertLayer(config), x, packing, additive_mask(mask, x.dtype))


def test_pruned_weights_are_the_selected_backbone_rows_and_columns(tiny_bert_dir):
    backbone = load_backbone(tiny_bert_dir)
    scores = scores_for(backbone)
    net = SideNetwork(side_config(backbone))
    chosen = apply_pruning_init(net, backbone.path, scores, "fisher")
    # Independent selection of the FFN dims of layer 2 and of the residual dims.
    ffn_rows = scores["fisher/enc/2/intermediate.dense.weight/row"]
    ffn = torch.sort(torch.argsort(ffn_rows, descending=True)[: 64 // 4]).values
    assert torch.equal(chosen[("enc", 2, "ffn")], ffn)
    resid_score = torch.zeros(32)
    for key, value in scores.items():
        method, stream, layer, name, axis = key.split("/")
        if method != "fisher":
            continue
        if axis == "col" and not name.startswith("output.dense") and "attention.output" not in name:
            resid_score += value  # Q, K, V and FFN-in read the residual
        if axis == "row" and (name.startswith("output.") or "attention.output" in name):
            resid_score += value  # O, FFN-out and layer norms write it
    resid = torch.sort(torch.topk(resid_score, 8).indices).values
    assert torch.equal(chosen["resid"], resid)
    block = backbone.model.encoder.layer[2]
    side = net.streams["enc"].blocks[1]
    expect_in = block.intermediate.dense.weight[ffn][:, resid]
    assert torch.equal(side.intermediate.dense.weight, expect_in)
    expect_out = block.output.dense.weight[resid][:, ffn]
    assert torch.equal(side.output.dense.weight, expect_out)
    attn = chosen[("enc", 2, "attn")]
    assert torch.equal(
        side.attention.self.query.weight, block.attention.self.query.weight[attn][:, resid]
    )
    # Each side head keeps dims of its own backbone head only (head_dim 8 -> 2).
    assert torch.equal(attn.view(4, 2) // 8, torch.arange(4)[:, None].expand(4, 2))


def test_fewer_side_heads_each_take_the_best_dims_of_one_backbone_head(tiny_bert_dir):
    """An encoder side network with fewer (wider) heads than the backbone: each side head is a
    subset of one backbone head, the heads whose best dims score highest, in order."""
    backbone = load_backbone(tiny_bert_dir)  # 4 heads of 8 dims; r 4: side width 8
    scores = scores_for(backbone)
    net = SideNetwork(dataclasses.replace(side_config(backbone), heads=2))
    assert net.side_config.num_attention_heads == 2
    chosen = apply_pruning_init(net, backbone.path, scores, "fisher")
    logs = sum(
        torch.log(scores[f"fisher/enc/2/attention.self.{p}.weight/row"] + 1e-30)
        for p in ("query", "key", "value")
    ).view(4, 8)
    best = torch.topk(logs, 4, dim=1)  # each side head is 8 / 2 = 4 wide
    heads = torch.sort(torch.topk(best.values.sum(1), 2).indices).values
    expect = (heads[:, None] * 8 + torch.sort(best.indices[heads], dim=1).values).flatten()
    assert torch.equal(chosen[("enc", 2, "attn")], expect)
    block, side = backbone.model.encoder.layer[2], net.streams["enc"].blocks[1]
    assert torch.equal(
        side.attention.output.dense.weight,
        block.attention.output.dense.weight[chosen["resid"]][:, expect],
    )
    # The block attends with two heads: the same weights split four ways give other outputs.
    four = SideNetwork(side_config(backbone))
    four.load_state_dict(net.state_dict())
    h = torch.randn(2, 5, 8)
    outputs = [n.eval().streams["enc"].blocks[1].attention.self(h)[0] for n in (net, four)]
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4


def test_a_model_saved_before_side_heads_keeps_the_backbone_heads(tiny_bert_dir, tmp_path):
    """A side config written before the `heads` field existed means the backbone's heads; a new
    model records its count, the family's default unless asked otherwise."""
    import json

    from side_trainer.artifacts import CONFIG_FILE, load_side_model, save_side_model

    backbone = load_backbone(tiny_bert_dir)  # 4 heads; r 4: 8 wide
    save_side_model(SideNetwork(dataclasses.replace(side_config(backbone), heads=2)), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["heads"] == 2
    assert load_side_model(tmp_path).side_config.num_attention_heads == 2
    del config["heads"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    assert load_side_model(tmp_path).side_config.num_attention_heads == 4
    assert backbone.family.default_side_heads(backbone.config, 4) == 1  # 8 < 16: one head


def test_side_heads_that_do_not_fit_are_refused(tiny_bert_dir, tiny_llama_dir):
    bert = load_backbone(tiny_bert_dir)
    with pytest.raises(FamilyError, match="multiple of the 3 attention heads.*side heads"):
        SideNetwork(dataclasses.replace(side_config(bert), heads=3))
    with pytest.raises(FamilyError, match="wider than the backbone's heads"):
        SideNetwork(dataclasses.replace(side_config(bert, reduction=2), heads=1))
    with pytest.raises(FamilyError, match="more than the backbone's 4"):
        SideNetwork(dataclasses.replace(side_config(bert, reduction=1), heads=8))
    llama = load_backbone(tiny_llama_dir)
    with pytest.raises(FamilyError, match="keeps the backbone's .* attention heads"):
        SideNetwork(dataclasses.replace(side_config(llama), heads=1))


def test_decoder_side_blocks_are_causal(tiny_llama_dir):
    backbone = load_backbone(tiny_llama_dir)
    net = SideNetwork(side_config(backbone)).eval()
    batch = make_batch(backbone)
    enc = batch["enc"]
    before = net.streams["enc"](enc["states"], enc["attention_mask"])
    changed = {k: v.clone() for k, v in enc["states"].items()}
    for v in changed.values():
        v[:, 3:] += torch.randn_like(v[:, 3:])
    after = net.streams["enc"](changed, enc["attention_mask"])
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6)
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_reduction_that_does_not_divide_the_width_is_refused(tiny_bert_dir):
    backbone = load_backbone(tiny_bert_dir)
    with pytest.raises(FamilyError, match="divide"):
        SideNetwork(side_config(backbone, reduction=5))
    with pytest.raises(FamilyError, match="multiple of the 4 attention heads"):
        SideNetwork(side_config(backbone, reduction=16))


def test_out_of_range_layer_is_refused(tiny_bert_dir):
    backbone = load_backbone(tiny_bert_dir)
    with pytest.raises(FamilyError, match="layers 0..2"):
        backbone.check_layers([0, 3])


def test_overlapped_joint_inference_equals_the_sequential_one(tiny_bert_dir):
    from api.inference import JointModel

    backbone = load_backbone(tiny_bert_dir)
    torch.manual_seed(1)
    sides = [
        SideNetwork(side_config(backbone)).eval(),
        SideNetwork(side_config(backbone, layers=[1, 2])).eval(),
    ]
    plain = JointModel(backbone, sides, overlap=False).probabilities(TEXTS)
    overlapped = JointModel(backbone, sides, overlap=True).probabilities(TEXTS)
    for a, b in zip(plain, overlapped):
        assert torch.allclose(a, b, atol=1e-6)


def test_joint_inference_packed_equals_it_padded(tiny_bert_dir, monkeypatch):
    """The joint pass packs the backbone's states once for all side networks: in turn, grouped
    and overlapped, the probabilities of the padded pass."""
    from api.inference import JointModel
    from side_trainer import packing

    backbone = load_backbone(tiny_bert_dir)
    torch.manual_seed(1)
    layers_each = [[0, 2], [0, 2], [1, 2]]  # two of one architecture: a group, and one apart
    sides = [SideNetwork(side_config(backbone, layers=layers)).eval() for layers in layers_each]
    for side in sides:  # away from the init's near-zero ladders
        for param in side.parameters():
            torch.nn.init.normal_(param, std=0.3)
    mask = backbone.tokenize(TEXTS, None, 32)["attention_mask"]
    assert packing.worth_packing("encoder", mask)
    ways = {"in turn": {}, "grouped": {"grouped": True}, "overlapped": {"overlap": True}}
    packed = {way: JointModel(backbone, sides, **o).probabilities(TEXTS) for way, o in ways.items()}
    monkeypatch.setattr(packing, "MIN_PADDING", 1.01)  # never worth packing
    padded = JointModel(backbone, sides).probabilities(TEXTS)
    for way, probabilities in packed.items():
        for a, b in zip(probabilities, padded, strict=True):
            assert torch.allclose(a, b, atol=1e-5), way
    assert max(float((p[:, 0] - 0.5).abs().max()) for p in padded) > 0.01  # not all even


def test_side_networks_run_grouped_by_default_only_in_large_passes_on_cuda(
    tiny_bert_dir, monkeypatch
):
    """Grouping was measured faster only on a GPU and from GROUPED_MIN_ON_CUDA side networks
    a pass; a pass asks for it or not explicitly anywhere."""
    from types import SimpleNamespace

    from api.inference import GROUPED_MIN_ON_CUDA, JointModel
    from side_trainer.group import SideGroup

    backbone = load_backbone(tiny_bert_dir)
    sides = [SideNetwork(side_config(backbone)).eval()] * GROUPED_MIN_ON_CUDA
    assert not JointModel(backbone, sides).grouped  # a CPU
    assert JointModel(backbone, sides, grouped=True).grouped
    gpu = SimpleNamespace(
        fingerprint=backbone.fingerprint, model=SimpleNamespace(device=torch.device("cuda"))
    )
    assert JointModel(gpu, sides).grouped
    assert not JointModel(gpu, sides[1:]).grouped
    assert not JointModel(gpu, sides, grouped=False).grouped
    # By default the size is a group's: a smaller group of the pass (another architecture)
    # runs in turn, with the outputs it gives grouped.
    torch.manual_seed(0)
    few = [SideNetwork(side_config(backbone)).eval() for _ in range(3)]
    grouped = JointModel(backbone, few, grouped=True).probabilities(TEXTS)
    joint = JointModel(backbone, few, grouped=True)
    joint.min_group = 4
    monkeypatch.setattr(SideGroup, "__call__", lambda *a, **k: pytest.fail("ran grouped"))
    for a, b in zip(joint.probabilities(TEXTS), grouped):
        assert torch.allclose(a, b, atol=1e-5)


def test_grouped_joint_inference_equals_the_sequential_one(tiny_bert_dir):
    """Side networks of one shape run as one vectorised group after the backbone pass; each
    gets what it gets alone, in its own place, also when the groups interleave."""
    from api.inference import InferenceError, JointModel

    backbone = load_backbone(tiny_bert_dir)
    torch.manual_seed(3)
    sides = [
        SideNetwork(side_config(backbone)).eval(),
        SideNetwork(side_config(backbone, layers=[1, 2])).eval(),
        SideNetwork(side_config(backbone)).eval(),
    ]
    plain = JointModel(backbone, sides, overlap=False).probabilities(TEXTS)
    grouped = JointModel(backbone, sides, overlap=False, grouped=True)
    calls = []
    run_grouped = grouped._grouped
    grouped._grouped = lambda *a: calls.append(1) or run_grouped(*a)
    for a, b in zip(plain, grouped.probabilities(TEXTS)):
        assert torch.allclose(a, b, atol=1e-6)
    assert calls == [1]  # the group ran, not the networks in turn
    assert not torch.allclose(plain[0], plain[2], atol=1e-3)  # two networks, not one twice
    with pytest.raises(InferenceError, match="pick one"):
        JointModel(backbone, sides, overlap=True, grouped=True)


def mapped_side(backbone, width_map: dict) -> SideNetwork:
    """A side network of a store of width K = d/4: its ladders read K-wide states through the
    given width maps (one (d, K) matrix per ladder; the dict is filled on first use, so one dict
    is one store). Weights are moved away from the init, so outputs differ between networks."""

    d = backbone.hidden_size
    spec = {"kind": "pca", "width": d // 4, "normalize": backbone.family.name == "decoder"}
    net = SideNetwork(dataclasses.replace(side_config(backbone), projection=spec)).eval()
    with torch.no_grad():
        for stream, stack in net.streams.items():
            for name, ladder in stack.ladders.items():
                if (stream, name) not in width_map:
                    width_map[stream, name] = torch.linalg.qr(torch.randn(d, d // 4))[0]
                getattr(stack, f"projection_{name}").copy_(width_map[stream, name])
                ladder.weight.normal_(0, 0.5)
            stack.gate_alpha.uniform_(-1, 1)
        if backbone.family.name == "encoder-decoder":
            load_lm_head(net, backbone.path)
        else:
            net.classifier[-1].weight.normal_(0, 1)
    return net


def test_joint_inference_maps_live_states_once_per_width_map(backbone, monkeypatch):
    """Networks of one store share its width map: the map runs once per pass for all of them;
    a network whose map is its own folds it into its ladders (also as a vectorised group).
    Every way gives what mapping each network's states first gives (how joint inference ran
    before), in every family."""
    import api.inference as inference
    from api.inference import JointModel

    torch.manual_seed(4)
    one_store: dict = {}
    sides = [mapped_side(backbone, one_store) for _ in range(inference.SHARED_MAP_MIN)]
    sides += [mapped_side(backbone, {}), mapped_side(backbone, {})]  # a map each: one group
    sides.append(SideNetwork(side_config(backbone)).eval())  # full width
    if backbone.family.name == "encoder-decoder":
        load_lm_head(sides[-1], backbone.path)
    assert len({s.projection_key() for s in sides}) == 4  # one store's map, two others, none
    monkeypatch.setattr(inference, "SHARED_MAP_MIN", 1)  # every map runs first, on its own
    expected = JointModel(backbone, sides, overlap=False).probabilities(TEXTS)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # not one output twice
    monkeypatch.undo()
    mapped = []
    real = SideNetwork.project_states
    monkeypatch.setattr(
        SideNetwork, "project_states", lambda self, *a: mapped.append(1) or real(self, *a)
    )
    t5 = backbone.family.name == "encoder-decoder"
    ways = (
        [{"overlap": False}] if t5 else [{"overlap": False}, {"overlap": True}, {"grouped": True}]
    )
    for options in ways:
        mapped.clear()
        got = JointModel(backbone, sides, **options).probabilities(TEXTS)
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        # one store's map once: per stream and label text for T5, per state when overlapped
        runs = 4 if t5 else len(LAYERS) + 1 if options.get("overlap") else 1
        assert len(mapped) == runs, options
    # Fewer networks of that store than pays for a shared map: each folds it in.
    mapped.clear()
    few = sides[inference.SHARED_MAP_MIN - 1 :]
    JointModel(backbone, few, overlap=False).probabilities(TEXTS)
    assert mapped == []


def test_a_width_map_written_to_gets_a_new_key(tiny_bert_dir):
    backbone = load_backbone(tiny_bert_dir)
    net = mapped_side(backbone, {})
    key = net.projection_key()
    assert net.projection_key() == key
    net.streams["enc"].projection_emb.mul_(2)
    assert net.projection_key() != key
    with torch.inference_mode():  # a model built for serving: its tensors keep no version
        served = mapped_side(backbone, {})
        assert served.projection_key() == served.projection_key() is not None


def test_side_networks_run_as_a_group_give_what_each_gives_alone(backbone):
    """Sweeps train networks of one shape as one group (stacked weights, one vectorised pass):
    each network's output is the one it gives alone, in every family."""
    from side_trainer.group import groups_of

    torch.manual_seed(2)
    nets = [SideNetwork(side_config(backbone)).eval() for _ in range(3)]
    nets.append(SideNetwork(side_config(backbone, reduction=2)).eval())  # a second group
    if backbone.family.name == "encoder-decoder":
        for net in nets:  # the frozen LM head the logits go through (zeros until loaded)
            load_lm_head(net, backbone.path)
    groups = groups_of(nets)
    assert sorted(len(g) for _, g in groups) == [1, 3]
    batch = make_batch(backbone)
    with torch.no_grad():
        for indices, group in groups:
            for k, out in zip(indices, group.eval()(batch)):
                assert torch.allclose(out, nets[k](batch), atol=1e-5)
        assert not torch.allclose(nets[0](batch), nets[1](batch))  # not one network copied


def test_a_group_training_with_eager_attention_gives_each_networks_gradients(backbone, monkeypatch):
    """A group that trains on CUDA runs eager attention (fused attention's vmap rule fails there
    with a mask): forced here on a CPU, its outputs and each network's gradients are the ones
    the network gives alone, with fused attention."""
    from side_trainer.group import SideGroup

    torch.manual_seed(3)
    nets = [SideNetwork(side_config(backbone)).train() for _ in range(2)]
    if backbone.family.name == "encoder-decoder":
        for net in nets:
            load_lm_head(net, backbone.path)
    monkeypatch.setattr(torch.nn.Dropout, "forward", lambda self, x: x)
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, *a, **k: x)
    batch = make_batch(backbone)
    group = SideGroup(nets, math_attention=True).train()
    outputs = group(batch)
    outputs.square().sum().backward()
    grouped = [[p.grad.clone() for p in n.parameters() if p.grad is not None] for n in nets]
    for net in nets:
        net.zero_grad(set_to_none=True)
    for k, net in enumerate(nets):
        alone = net(batch)
        assert torch.allclose(outputs[k], alone, atol=1e-5)
        alone.square().sum().backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert len(grads) == len(grouped[k]) > 0
        for a, b in zip(grouped[k], grads):  # to float rounding at the gradient's scale
            assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()) + 1e-6


@pytest.mark.parametrize("init", ["fisher", "magnitude", "random"])
def test_save_then_load_gives_identical_logits(backbone, init, tmp_path):
    """Everything the trained network computes with is saved: weights, gates, and for decoder-only
    backbones the pruned rotary frequencies (a buffer transformers does not persist)."""
    from side_trainer.artifacts import load_side_model, save_side_model

    torch.manual_seed(0)
    net = SideNetwork(side_config(backbone))
    if init != "random":
        apply_pruning_init(net, backbone.path, scores_for(backbone), init)
    if backbone.family.name == "encoder-decoder":
        load_lm_head(net, backbone.path)
    with torch.no_grad():
        net.streams["enc"].gate_alpha.uniform_(-1, 1)
    net.eval()
    batch = make_batch(backbone)
    save_side_model(net, tmp_path)
    loaded = load_side_model(tmp_path, backbone.path)
    with torch.no_grad():
        assert torch.equal(net(batch), loaded(batch))


def python_bytes_kept(make):
    """make()'s result, and the bytes of Python objects it left allocated (tracemalloc)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = make()
        gc.collect()
        return out, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_loading_a_model_again_and_again_keeps_nothing(backbone, tmp_path):
    """A server loads evicted side models again and again: a load keeps nothing once the model
    is dropped (safetensors' load_file kept ~3.5 KB of Python objects per call)."""
    if backbone.family.name == "encoder-decoder":
        pytest.skip("a T5 load also reads the backbone's LM head through safe_open (~0.5 KB kept)")
    from side_trainer.artifacts import load_side_model, save_side_model

    save_side_model(SideNetwork(side_config(backbone)), tmp_path)
    load_side_model(tmp_path, backbone.path)
    _, kept = python_bytes_kept(
        lambda: all(load_side_model(tmp_path, backbone.path) for _ in range(100))
    )
    assert kept < 50_000, f"{kept} bytes kept after 100 loads"


def test_module_bytes_counts_weights_and_python_objects(backbone, tmp_path):
    """The side-model cache's budget counts what a model holds: its tensors' bytes and its
    Python objects, the latter within 20% of what tracemalloc sees a load keep."""
    from side_trainer.artifacts import load_side_model, save_side_model
    from side_trainer.memory import module_bytes

    save_side_model(SideNetwork(side_config(backbone)), tmp_path)
    load_side_model(tmp_path, backbone.path)
    nets, kept = python_bytes_kept(
        lambda: [load_side_model(tmp_path, backbone.path) for _ in range(5)]
    )
    weights = sum(t.numel() * t.element_size() for t in nets[0].state_dict().values())
    extra = getattr(nets[0], "lm_head", torch.empty(0))  # T5's frozen head: a buffer, not saved
    weights += extra.numel() * extra.element_size()
    python = module_bytes(nets[0]) - weights
    assert 0.8 * kept / 5 <= python <= 1.2 * kept / 5, (python, kept / 5)


def test_a_model_saved_without_rotary_frequencies_still_loads(tiny_llama_dir, tmp_path, caplog):
    """Decoder models saved before the frequencies were persisted load with the defaults, and the
    log says they should be retrained."""
    from safetensors.torch import load_file, save_file

    from side_trainer.artifacts import WEIGHTS_FILE, load_side_model, save_side_model

    backbone = load_backbone(tiny_llama_dir)
    save_side_model(SideNetwork(side_config(backbone)), tmp_path)
    state = load_file(tmp_path / WEIGHTS_FILE)
    del state["streams.enc.rotary.inv_freq"]
    save_file(state, tmp_path / WEIGHTS_FILE)
    with caplog.at_level("WARNING"):
        load_side_model(tmp_path)
    assert "retrain" in caplog.text


def test_max_pooling_takes_each_channels_largest_real_token(tiny_bert_dir):
    backbone = load_backbone(tiny_bert_dir)
    cfg = side_config(backbone)
    cfg.pooling = "max"
    net = SideNetwork(cfg)
    h = torch.tensor([[[1.0, -2.0], [3.0, -1.0], [9.0, 9.0]]])  # (1, 3, 2); token 3 is padding
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(net.pool(h, mask), torch.tensor([[3.0, -1.0]]))
