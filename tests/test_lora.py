"""LoRA adapters: PEFT's file format both ways, switching off, merging, stacking, and the stages with --lora-rank."""

from __future__ import annotations

import json

import pytest
import torch

from prefcli import lora
from conftest import CHAT_LINES
from prefcli.model import ModelConfig, Transformer, load_model, save_model




def tiny_model(score_head=False, lm_head=True, seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
    return Transformer(cfg, lm_head=lm_head, score_head=score_head)


def trained_adapters(model: Transformer, spec: lora.LoraSpec, seed=1) -> Transformer:
    """Adapters with random (non-zero) B, as after some training."""
    lora.add_adapters(model, spec, trainable_head="score")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "lora_B" in m._modules:
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


IDS = torch.tensor([[5, 17, 3, 44, 9, 61, 2, 8]])


def test_peft_loads_the_adapter_onto_the_base_and_gives_the_same_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    save_model(tiny_model(), base)
    model = trained_adapters(load_model(base), lora.LoraSpec(4, alpha=8, targets=lora.ALL_TARGETS))
    ours = model(IDS)
    lora.save_adapter(model, tmp_path / "adapter", base)

    names = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert names["r"] == 4 and names["lora_alpha"] == 8 and names["task_type"] == "CAUSAL_LM"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter/adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * 2  # A and B, 7 projections, 2 layers

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = hf(IDS).logits
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-5, rtol=1e-4)
    # prefcli loads the adapter folder as a model too (base found through adapter_config.json).
    torch.testing.assert_close(load_model(tmp_path / "adapter")(IDS).detach(), theirs, atol=1e-5, rtol=1e-4)


def test_reward_adapter_keeps_its_score_head_and_peft_scores_the_same(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = tmp_path / "base"
    save_model(tiny_model(), base)
    model = load_model(base, score_head=True)
    model.lm_head = None
    trained_adapters(model, lora.LoraSpec(2, targets=("q_proj", "v_proj")))
    assert model.score.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    with torch.no_grad():
        model.score.weight.normal_()
    ours = model.sequence_scores(IDS)
    lora.save_adapter(model, tmp_path / "rm", base, reward=True)
    assert json.loads((tmp_path / "rm/adapter_config.json").read_text())["modules_to_save"] == ["score"]

    hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    hf = PeftModel.from_pretrained(hf, tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = hf(IDS).logits[:, 0]
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-5, rtol=1e-4)
    again = load_model(tmp_path / "rm", kind="reward")
    assert again.lm_head is None
    torch.testing.assert_close(again.sequence_scores(IDS).detach(), theirs, atol=1e-5, rtol=1e-4)


def test_only_adapters_train_and_switching_them_off_gives_the_base():
    model = tiny_model()
    base_logits = model(IDS).detach()
    trained_adapters(model, lora.LoraSpec(4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2
    adapted = model(IDS).detach()
    assert (adapted - base_logits).abs().max() > 1e-3
    with lora.adapters_disabled(model):
        torch.testing.assert_close(model(IDS).detach(), base_logits)
    torch.testing.assert_close(model(IDS).detach(), adapted)  # back on after the block
    lora.merge_adapters(model)
    assert not lora.has_adapters(model)
    torch.testing.assert_close(model(IDS).detach(), adapted, atol=1e-5, rtol=1e-4)


def test_adapters_and_fused_decoding_agree():
    from prefcli.model import KVCache, fused_projections

    model = trained_adapters(tiny_model(), lora.LoraSpec(4)).eval()
    want = model(IDS)[:, -1]
    with torch.no_grad(), fused_projections(model):
        cache = KVCache.for_model(model, 1, 16)
        model(IDS[:, :-1], kv_cache=cache)
        got = model(IDS[:, -1:], kv_cache=cache)[:, -1]
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-4)


def test_an_adapter_trained_on_an_adapter_is_saved_stacked_on_the_first_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    save_model(tiny_model(), base)
    first = trained_adapters(load_model(base), lora.LoraSpec(2, targets=("q_proj", "up_proj")), seed=1)
    lora.save_adapter(first, tmp_path / "sft", base)
    start = load_model(tmp_path / "sft")  # base + sft adapter merged in memory, remembered
    sft_logits = start(IDS).detach()
    second = trained_adapters(start, lora.LoraSpec(3, targets=("q_proj", "v_proj")), seed=2)
    with lora.adapters_disabled(second):  # the reference of a run on top of sft is sft itself
        torch.testing.assert_close(second(IDS).detach(), sft_logits)
    ours = second(IDS).detach()
    lora.save_adapter(second, tmp_path / "dpo", start.lora_base)
    cfg = json.loads((tmp_path / "dpo/adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["target_modules"] == ["q_proj", "up_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "dpo").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours, atol=1e-5, rtol=1e-4)


def test_bad_lora_options_are_one_line_errors():
    from prefcli.errors import PrefcliError

    with pytest.raises(PrefcliError, match="--lora-targets: unknown layer"):
        lora.LoraSpec(4, targets=("q_proj", "attn"))
    with pytest.raises(PrefcliError, match="--lora-dropout"):
        lora.LoraSpec(4, dropout=1.5)


def test_save_keeps_a_bf16_checkpoint_bf16(tmp_path):
    from safetensors import safe_open

    save_model(tiny_model().to(torch.bfloat16), tmp_path / "bf16")
    model = load_model(tmp_path / "bf16")  # trains in float32
    assert model.model.embed_tokens.weight.dtype == torch.float32 and model.config.dtype == "bfloat16"
    save_model(model, tmp_path / "again")
    with safe_open(str(tmp_path / "again/model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "again/config.json").read_text())["torch_dtype"] == "bfloat16"


def test_grad_checkpoint_gives_the_same_gradients():
    model = tiny_model()
    model.train()
    model(IDS).logsumexp(-1).mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.grad_checkpoint = True
    model(IDS).logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the stages, end to end
def test_import_sft_reward_dpo_chat_eval_with_lora(cli, chat_ws, tmp_path):
    """import -> sft --lora-rank 16 -> reward train --lora-rank 16 -> dpo --lora-rank 16 -> chat -> eval compare."""
    from peft import PeftModel
    from test_import import write_gguf
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from conftest import write_jsonl

    ws, files = chat_ws
    write_gguf(ws / "models/base", tmp_path / "tiny.gguf")
    assert cli("-w", ws, "import", tmp_path / "tiny.gguf", "--name", "tiny").code == 0
    fast = ["--batch-size", "4", "--warmup", "0", "--lr", "1e-2", "--val-fraction", "0", "--json"]

    r = cli("-w", ws, "align", "--method", "sft", "--policy", "tiny", "--data", files["chats"], "--max-steps", "30",
            "--lora-rank", "16", *fast)
    assert r.code == 0, r.stderr
    sft = ws / "models/sft"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in sft.iterdir()}
    assert not (sft / "model.safetensors").exists()
    meta = json.loads((sft / "meta.json").read_text())
    assert meta["adapter"] is True and any(p.get("role") == "adapter_base" and p["name"] == "tiny" for p in meta["parents"])

    r = cli("-w", ws, "reward", "train", "--base", "sft", "--data", files["pairs"], "--max-steps", "10",
            "--lora-rank", "16", *fast)
    assert r.code == 0, r.stderr
    r = cli("-w", ws, "align", "--method", "dpo", "--policy", "sft", "--data", files["pairs"], "--max-steps", "10",
            "--lora-rank", "16", "--rpo-alpha", "1", *fast)
    assert r.code == 0, r.stderr
    last = json.loads((ws / "runs/dpo/metrics.jsonl").read_text().splitlines()[-1])
    assert last["rewards/margins"] > 0  # the adapter learned the preference against the sft reference

    # Each adapter loads in PEFT onto the imported base and gives prefcli's logits / scores.
    ids = torch.tensor([[1, 40, 41, 300, 7, 99]])
    base_dir = ws / "models/tiny"
    for name in ("sft", "dpo"):
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), ws / "models" / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(load_model(ws / "models" / name)(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    hf = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1),
                                   ws / "models/rm").eval()
    with torch.no_grad():
        torch.testing.assert_close(load_model(ws / "models/rm").sequence_scores(ids), hf(ids).logits[:, 0],
                                   atol=1e-4, rtol=1e-4)
    # DPO started from the sft adapter: its adapter holds both (rank 32) on the imported base.
    assert json.loads((ws / "models/dpo/adapter_config.json").read_text())["r"] == 32

    r = cli("-w", ws, "chat", "--model", "sft", "--prompt", "What is two plus three?", "--temperature", "0")
    assert r.code == 0, r.stderr
    assert r.stdout.strip() == "Two plus three is five."
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in CHAT_LINES])
    r = cli("-w", ws, "eval", "compare", "--model", "dpo", "--reference", "sft", "--judge-model", "rm",
            "--prompts", prompts, "--max-tokens", "8", "--json")
    assert r.code == 0, r.stderr
    r = cli("-w", ws, "reward", "score", "--model", "rm", "--prompt", "hi", "--response", "Hello.", "--json")
    assert r.code == 0, r.stderr


def test_report_to_tensorboard_mirrors_metrics_jsonl(cli, chat_ws):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ws, files = chat_ws
    r = cli("-w", ws, "align", "--method", "sft", "--data", files["chats"], "--max-steps", "3", "--batch-size", "4",
            "--val-fraction", "0", "--report-to", "tensorboard", "--json")
    assert r.code == 0, r.stderr
    line = json.loads((ws / "runs/sft/metrics.jsonl").read_text().splitlines()[-1])
    events = EventAccumulator(str(ws / "runs/sft/tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [3] and loss[0].value == pytest.approx(line["loss"], rel=1e-6)
    r = cli("-w", ws, "align", "--method", "sft", "--data", files["chats"], "--report-to", "mlflow", "--overwrite")
    assert r.code == 2 and "--report-to mlflow: not one of tensorboard, wandb" in r.stderr


def test_merge_writes_the_plain_model_the_adapter_gives(cli, chat_ws):
    ws, files = chat_ws
    args = ["align", "--method", "sft", "--data", files["chats"], "--max-steps", "3", "--batch-size", "4",
            "--val-fraction", "0", "--lr", "1e-2", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,down_proj"]
    assert cli("-w", ws, *args, "--out", "a").code == 0
    r = cli("-w", ws, *args, "--out", "m", "--merge", "--grad-checkpoint")
    assert r.code == 0, r.stderr
    assert (ws / "models/m/model.safetensors").is_file() and not (ws / "models/m/adapter_config.json").exists()
    targets = json.loads((ws / "models/a/adapter_config.json").read_text())["target_modules"]
    assert targets == ["down_proj", "q_proj", "v_proj"]
    ids = torch.tensor([[1, 40, 41, 300, 7, 99]])
    adapter, merged, base = (load_model(ws / "models" / n)(ids) for n in ("a", "m", "base"))
    torch.testing.assert_close(merged, adapter, atol=1e-4, rtol=1e-4)
    assert (adapter - base).abs().max() > 1e-3  # the adapter changed the model
    r = cli("-w", ws, *args, "--out", "b", "--precision", "bf16", "--json")  # bf16 autocast on CPU runs
    assert r.code == 0, r.stderr
    r = cli("-w", ws, *args, "--out", "c", "--lora-targets", "q_proj,attn")
    assert r.code == 2 and "--lora-targets: unknown layer(s) attn" in r.stderr and not (ws / "models/c").exists()
