"""Tests of lora.py and peft_io.py: a fresh adapter is exactly the base, merged equals unmerged, only the adapters
learn, our LoRA equals peft's LoraModel on a tiny random LLaMA, adapters move between us and peft both ways, and
each bad input is one clear line.

    uv run pytest phase2_finetuning/project5_lora/test_lora.py -q
    uv run python phase2_finetuning/project5_lora/test_lora.py          # a demo: what LoRA adds to a tiny model
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from course.errors import CourseError
from phase1_foundation.project3_pretrain.hf_interop import export_hf
from phase1_foundation.project3_pretrain.testing import tiny_llama
from phase2_finetuning.project5_lora.config import LoRAConfig
from phase2_finetuning.project5_lora.finetune import adapter_optimizer
from phase2_finetuning.project5_lora.lora import (
    LoRALinear,
    adapters_disabled,
    count_trainable,
    hf_module_names,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from phase2_finetuning.project5_lora.nf4 import quantize_model
from phase2_finetuning.project5_lora.peft_io import CONFIG_NAME, WEIGHTS_NAME, peft_key

TARGETS = ["q_proj,v_proj", "all-linear", ["wk", "down_proj"], r".*layers\.1\..*_proj"]


def _idx(B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 97, (B, T))  # fresh every call: no input the code could have been tuned to


def _randomize(model) -> None:
    """B = 0 hides every bug of the update path: give the adapters random values of a realistic size."""
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(0, 0.05)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


# ---- the layer ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", TARGETS, ids=str)
def test_fresh_adapters_give_exactly_the_base_logits(targets):
    model = tiny_llama(seed=1)
    idx = _idx()
    with torch.no_grad():
        base = model(idx)[0]
        names = inject_lora(model, targets, r=4, alpha=8)
        assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
        assert torch.equal(model(idx)[0], base)  # B = 0: bit for bit, not just close


def test_fresh_adapters_on_an_nf4_base_give_exactly_the_nf4_logits():
    model = tiny_llama(seed=2)
    quantize_model(model)
    idx = _idx()
    with torch.no_grad():
        base = model(idx)[0]
        inject_lora(model, "all-linear", r=4)
        assert torch.equal(model(idx)[0], base)


def test_init_is_kaiming_uniform_A_and_zero_B():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(300, 200, bias=False), r=16, alpha=32)
    bound = 1 / 300 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 300: U(-1/sqrt(300), 1/sqrt(300))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.scale == 2.0
    assert LoRALinear(torch.nn.Linear(8, 8), r=4, alpha=8, use_rslora=True).scale == 4.0


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,o_proj,up_proj"])
def test_merged_equals_unmerged_and_unmerge_restores_the_base(targets):
    model = tiny_llama(seed=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, targets, r=4, alpha=16)
    _randomize(model)
    idx = _idx()
    with torch.no_grad():
        unmerged = model(idx)[0]
        merge_lora(model)
        torch.testing.assert_close(model(idx)[0], unmerged, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(idx)[0], tiny_llama(seed=3)(idx)[0], atol=1e-3)  # the update is real
        unmerge_lora(model)
        torch.testing.assert_close(model(idx)[0], unmerged, rtol=1e-5, atol=1e-5)
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base.weight, weights[f"{n}.weight"], rtol=0, atol=1e-6)


def test_merge_and_unload_leaves_a_plain_model_with_the_same_logits():
    model = tiny_llama(seed=4)
    inject_lora(model, "all-linear", r=2)
    _randomize(model)
    idx = _idx()
    with torch.no_grad():
        before = model(idx)[0]
        merge_and_unload(model)
        torch.testing.assert_close(model(idx)[0], before, rtol=1e-5, atol=1e-5)
    assert not lora_layers(model) and set(model.state_dict()) == set(tiny_llama().state_dict())


def test_only_adapter_parameters_get_gradients_and_the_optimizer_holds_only_them():
    model = tiny_llama(seed=5).train()
    inject_lora(model, "all-linear", r=4, dropout=0.1)
    _randomize(model)
    idx = _idx(3, 16)
    model(idx, idx)[1].backward()
    adapters = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    opt = adapter_optimizer(model, LoRAConfig(), "cpu")
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == adapters and len(held) == len(adapters)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in adapters}
    opt.step()
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n


def test_count_trainable_is_r_times_in_plus_out_per_layer():
    model = tiny_llama(seed=6)
    total = model.num_params()
    inject_lora(model, "q_proj,v_proj", r=4)
    c = model.config  # q: 32 -> 4*8, v: 32 -> 2*8 (GQA), two layers
    expected = c.n_layer * 4 * ((c.n_embd + c.n_head * c.hd) + (c.n_embd + c.n_kv_head * c.hd))
    assert count_trainable(model) == (expected, total + expected)


def test_adapters_disabled_is_exactly_the_base_and_restores_the_adapters():
    model = tiny_llama(seed=7)
    idx = _idx()
    with torch.no_grad():
        base = model(idx)[0]
        inject_lora(model, "all-linear", r=4)
        _randomize(model)
        tuned = model(idx)[0]
        with adapters_disabled(model):
            assert torch.equal(model(idx)[0], base)
        assert torch.equal(model(idx)[0], tuned)
        merge_lora(model)
        with pytest.raises(CourseError, match="unmerge"), adapters_disabled(model):
            pass


def test_targets_resolve_in_our_names_and_transformers_names():
    model = tiny_llama(seed=8)
    assert inject_lora(model, ["wq", "gate_proj"], r=2) == ["layers.0.attn.wq", "layers.0.mlp.w1",
                                                             "layers.1.attn.wq", "layers.1.mlp.w1"]
    names = hf_module_names(model)
    assert names["layers.1.mlp.w2"] == "model.layers.1.mlp.down_proj" and names["lm_head"] == "lm_head"
    all_linear = inject_lora(tiny_llama(), "all-linear", r=2)
    assert len(all_linear) == 14 and "lm_head" not in all_linear  # peft's rule: not the output layer
    assert inject_lora(tiny_llama(), re.compile(r".*\.1\.self_attn\.[qk]_proj"), r=2) == ["layers.1.attn.wq",
                                                                                           "layers.1.attn.wk"]


# ---- peft, the reference -------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers", reason="transformers (dev dependency) is needed for peft tests")
peft = pytest.importorskip("peft", reason="peft (dev dependency) is needed for the interop tests")


def _hf_twin(model, tmp_path):
    """The same weights as a transformers LlamaForCausalLM, through project 3's export (config.json + safetensors)."""
    export_hf(model, tmp_path / "hf")
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()


def _peft_lora_modules(pm) -> dict[str, object]:
    """peft's LoRA layers by transformers module name (PeftModel -> LoraModel -> LlamaForCausalLM -> ...)."""
    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


@pytest.mark.parametrize("targets,dropout,rslora", [(["q_proj", "v_proj"], 0.0, False), ("all-linear", 0.1, False),
                                                    (["k_proj", "up_proj", "down_proj"], 0.0, True)], ids=str)
def test_our_lora_equals_peft_lora_model_with_the_same_weights(tmp_path, targets, dropout, rslora):
    ours = tiny_llama(seed=9, tie_embeddings=True)
    ref = _hf_twin(ours, tmp_path)
    inject_lora(ours, targets, r=4, alpha=12, dropout=dropout, use_rslora=rslora)
    _randomize(ours)
    cfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=targets, use_rslora=rslora)
    pm = peft.get_peft_model(ref, cfg).eval()
    theirs, alias = _peft_lora_modules(pm), hf_module_names(ours)
    assert sorted(theirs) == sorted(alias[n] for n in lora_layers(ours))  # the same layers wrapped
    with torch.no_grad():
        for n, m in lora_layers(ours).items():
            theirs[alias[n]].lora_A["default"].weight.copy_(m.lora_A)
            theirs[alias[n]].lora_B["default"].weight.copy_(m.lora_B)
    ours.eval()
    idx = _idx(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], pm(idx).logits, rtol=1e-5, atol=1e-5)
        if dropout:  # in training mode too: both draw the same masks, on the adapter's input, in the same order
            ours.train(), pm.train()
            torch.manual_seed(5)
            mine = ours(idx)[0]
            torch.manual_seed(5)
            torch.testing.assert_close(mine, pm(idx).logits, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(mine, ours.eval()(idx)[0], atol=1e-4)  # and the dropout did something


def test_our_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    ours = tiny_llama(seed=10)
    ref = _hf_twin(ours, tmp_path)
    inject_lora(ours, "q_proj,v_proj,o_proj", r=4, alpha=8)
    _randomize(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["o_proj", "q_proj", "v_proj"] and cfg["r"] == 4
    pm = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)


def test_a_partial_selection_is_saved_with_full_names_so_peft_wraps_the_same_layers(tmp_path):
    ours = tiny_llama(seed=11)
    ref = _hf_twin(ours, tmp_path)
    inject_lora(ours, r"layers\.1\.attn\.wq", r=2)
    _randomize(ours)
    save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["target_modules"] == \
        ["model.layers.1.self_attn.q_proj"]
    pm = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    assert len(_peft_lora_modules(pm)) == 1
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(pm(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj", "gate_proj"], "all-linear", r".*\.0\..*(q|v)_proj"], ids=str)
def test_a_peft_trained_adapter_loads_into_ours(tmp_path, targets):
    base = tiny_llama(seed=12)
    ref = _hf_twin(base, tmp_path)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                  init_lora_weights="gaussian"))
    with torch.no_grad():
        for m in _peft_lora_modules(pm).values():
            m.lora_B["default"].weight.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    names = load_adapter(base, tmp_path / "peft")
    assert len(names) == len(_peft_lora_modules(pm))
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(base(idx)[0], pm(idx).logits, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_exact(tmp_path):
    a = tiny_llama(seed=13)
    inject_lora(a, "all-linear", r=4, alpha=4)
    _randomize(a)
    save_adapter(a, tmp_path)
    b = tiny_llama(seed=13)
    load_adapter(b, tmp_path)
    for (n, x), y in zip(lora_layers(a).items(), lora_layers(b).values()):
        assert torch.equal(x.lora_A, y.lora_A) and torch.equal(x.lora_B, y.lora_B), n
    idx = _idx()
    with torch.no_grad():
        assert torch.equal(a(idx)[0], b(idx)[0])


# ---- bad input: one clear line each ---------------------------------------------------------------------------
def test_a_target_that_matches_nothing_is_one_line_naming_it():
    model = tiny_llama()
    with pytest.raises(CourseError) as e:
        inject_lora(model, "q_proj,x_proj")
    assert "'x_proj' matches no linear layer" in _one_line(e) and "q_proj" in str(e.value)
    assert not lora_layers(model)  # nothing half done
    with pytest.raises(CourseError, match="not a valid regular expression"):
        inject_lora(model, "layers.(")


@pytest.mark.parametrize("r,fragment", [(0, "must be an integer > 0"), (-2, "must be an integer > 0"),
                                        (20, "must be <= min(in, out) = 16 of layer layers.0.attn.wv"),
                                        (2.5, "must be an integer > 0")])
def test_bad_ranks_are_one_line(r, fragment):
    model = tiny_llama()  # wv: 32 -> 16 (2 KV heads of 8)
    with pytest.raises(CourseError) as e:
        inject_lora(model, "q_proj,v_proj", r=r)
    assert fragment in _one_line(e)
    assert not lora_layers(model)


def test_an_adapter_for_another_base_is_one_line_naming_the_tensor(tmp_path):
    other = tiny_llama(n_embd=48, n_head=4, n_kv_head=2)
    inject_lora(other, "q_proj", r=4)
    save_adapter(other, tmp_path)
    with pytest.raises(CourseError) as e:
        load_adapter(tiny_llama(), tmp_path)
    msg = _one_line(e)
    assert peft_key("model.layers.0.self_attn.q_proj", "A") in msg and "(4, 48)" in msg and "another base" in msg
    deeper = tiny_llama(n_layer=3)
    inject_lora(deeper, "q_proj", r=4)
    save_adapter(deeper, tmp_path / "deeper")
    with pytest.raises(CourseError, match="layers.2.self_attn.q_proj' in this model"):
        load_adapter(tiny_llama(), tmp_path / "deeper")


def test_merging_twice_and_unmerging_an_unmerged_model_are_one_line():
    model = tiny_llama()
    inject_lora(model, "q_proj", r=2)
    merge_lora(model)
    with pytest.raises(CourseError) as e:
        merge_lora(model)
    assert "already merged" in _one_line(e)
    unmerge_lora(model)
    with pytest.raises(CourseError, match="not merged"):
        unmerge_lora(model)
    with pytest.raises(CourseError, match="already has LoRA layers"):
        inject_lora(model, "v_proj")


def test_merging_into_a_4bit_base_or_a_tied_lm_head_is_one_line():
    model = tiny_llama()
    quantize_model(model)
    inject_lora(model, "q_proj", r=2)
    with pytest.raises(CourseError, match="dequantize_model"):
        merge_lora(model)
    tied = tiny_llama(tie_embeddings=True)
    inject_lora(tied, "lm_head", r=2)
    with pytest.raises(CourseError, match="tied"):
        merge_lora(tied)


@pytest.mark.parametrize("change,fragment", [
    ({"use_dora": True}, "use_dora=true"), ({"bias": "all"}, 'bias="all"'),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"), ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"), ({"task_type": "SEQ_CLS"}, "task_type"),
    ({"r": 0}, "r (0) must be an integer > 0"), ({"target_modules": None}, "target_modules"),
    ({"some_future_option": {"x": 1}}, "some_future_option")], ids=str)
def test_peft_options_we_do_not_support_are_one_line(tmp_path, change, fragment):
    model = tiny_llama()
    inject_lora(model, "q_proj", r=2)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CourseError) as e:
        load_adapter(tiny_llama(), tmp_path)
    assert fragment in _one_line(e)


def test_missing_or_corrupt_adapter_files_are_one_line(tmp_path):
    with pytest.raises(CourseError, match="adapter_config.json not found"):
        load_adapter(tiny_llama(), tmp_path)
    model = tiny_llama()
    inject_lora(model, "q_proj", r=2)
    save_adapter(model, tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x00" * 20)
    with pytest.raises(CourseError) as e:
        load_adapter(tiny_llama(), tmp_path)
    assert "corrupt" in _one_line(e)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CourseError, match="not valid JSON"):
        load_adapter(tiny_llama(), tmp_path)


def _demo() -> None:
    model = tiny_llama(seed=0)
    total = model.num_params()
    for targets in ("q_proj,v_proj", "all-linear"):
        m = tiny_llama(seed=0)
        names = inject_lora(m, targets, r=4)
        t, _ = count_trainable(m)
        print(f"{targets:>14}: {len(names)} layers wrapped, {t:,} trainable of {total:,} ({100 * t / total:.1f}%)")
    print(lora_layers(m)["layers.0.attn.wq"])


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(_demo, __doc__)
