"""`prefcli align --method steer`: conditional SFT on replies labelled with attribute vectors.

Recipe (SteerLM, Dong et al. 2023; conditional training, Keskar et al. 2019 / Korbak et
al. 2023): label every reply with its attribute vector, add the vector's learned
projection to the token embeddings (`prefcli.steer`), train the policy and the
projection together with the SFT loss on assistant tokens, save the model folder with
steer.safetensors + steer.json beside it. At inference `--prefer correct=1,polite=0`
picks the vector: the model writes the kind of reply that carried those labels.

Labels come from (all in [0, 1]):
- the demo (no --data): the gold judge's correct / polite / concise of the demo SFT
  chats and of both replies of the demo preference pairs (they differ in one or two
  flaws: the sharpest signal of what each attribute means);
- the data: rows {"messages" | "prompt" + "completion"/"response", "attributes": {name: weight}};
- reward models: --attribute NAME=REWARD_MODEL scores every reply, and the score's
  rank among the training replies (0 lowest, 1 highest) is the label.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from prefcli import distributed as dist
from prefcli.config import to_dict
from prefcli.data.sources import demo_conversations, demo_input, demo_pairs, file_inputs, split_val, use_demo
from prefcli.data.examples import Encoded, chat_from_row, encode_chat, pad_batch, prompt_text
from prefcli.data.readers import read_rows
from prefcli.errors import PrefcliError
from prefcli.config import option
from prefcli.objectives.lm import lm_loss
from prefcli.artifacts import TrainingOptions, load_model_artifact, note, prepare_run, save_model_artifact, train_config
from prefcli.steer import SteeredLM, Steering
from prefcli.trainer import Trainer
from prefcli.workspace import Workspace


@dataclass
class SteerConfig(TrainingOptions):
    data: list[str] = option(factory=list, default_text="the method's built-in demo data",  # empty: demo chats + demo pairs, labelled by the gold judge
                             help="Training data files, folders or globs; repeatable.")
    attribute: list[str] = option(factory=list, default_text="none",  # NAME=REWARD_MODEL: labels from reward models
                                  help="NAME=REWARD_MODEL labels each reply's attribute NAME with its reward's rank (repeatable).")
    policy: str = option("sft", "Model to start from.")
    out: str = option("steer", "Name of the model to write.", default_text="the method's name")
    val_fraction: float = option(0.05, "Share of the data held out for validation.", ge=0, lt=1)


DEFAULT_STEPS = 300  # without data to count (not used when there is)
DEFAULT_EPOCHS = 1.44  # 300 steps over the 6,650 labelled demo replies left after the validation split, at batch 32


# ----------------------------------------------------------------------------- labelled replies

def demo_examples() -> tuple[list[list[dict]], dict[str, list[float]], dict[str, str]]:
    """The demo SFT chats and both replies of each demo train pair, with the gold judge's labels."""
    from prefcli.data import demo

    convos = demo_conversations()
    for p in demo_pairs("train"):
        convos += [p.prompt + p.chosen, p.prompt + p.rejected]
    scores = [demo.judge(prompt_text(m[:-1]), m[-1]["content"]) for m in convos]
    labels = {a: [s[a] for s in scores] for a in demo.ATTRIBUTES}
    return convos, labels, {a: "demo gold judge" for a in demo.ATTRIBUTES}


def data_examples(data: list[str]) -> tuple[list[list[dict]], dict[str, list[float]], dict[str, str]]:
    """Conversations from the user's rows and the weights in their "attributes" (if any)."""
    rows = read_rows(data, option="--data")
    convos, labels, names = [], {}, None
    for i, rec in enumerate(rows):
        where = rec["_source"]
        if "response" in rec and "completion" not in rec and "messages" not in rec:
            rec = {**rec, "completion": rec["response"]}
        convos.append(chat_from_row(rec))
        attrs = rec.get("attributes")
        if attrs is None:
            attrs = {}
        if not isinstance(attrs, dict):
            raise PrefcliError(f"{where}: 'attributes' must be an object of NAME: WEIGHT", 'e.g. "attributes": {"helpful": 0.9}')
        if names is None:
            names = list(attrs)
            labels = {a: [] for a in names}
        if set(attrs) != set(names):
            raise PrefcliError(f"{where}: attributes {', '.join(sorted(attrs)) or 'none'} differ from the first row's "
                               f"({', '.join(names) or 'none'})", "give every row the same attributes")
        for a in names:
            w = attrs[a]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:
                raise PrefcliError(f"{where}: attribute {a} is {w!r}, not a number from 0 to 1",
                                   "scale weights to [0, 1] (e.g. a 0-4 rating divided by 4)")
            labels[a].append(float(w))
    return convos, labels, {a: "data" for a in labels}


def rank_labels(scores: list[float]) -> list[float]:
    """Each score's rank among all of them, scaled to [0, 1] (ties share their mean rank)."""
    n = len(scores)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: scores[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 / (n - 1)
        i = j + 1
    return ranks


def reward_model_labels(ws: Workspace, specs: list[str], convos: list[list[dict]], device,
                        taken: set[str]) -> tuple[dict[str, list[float]], dict[str, str], list[dict]]:
    """--attribute NAME=REWARD_MODEL: each reply's reward, as its rank among the training replies."""
    from prefcli.inference import RewardScorer

    labels, sources, parents = {}, {}, []
    prompts = [m[:-1] for m in convos]
    replies = [m[-1]["content"] for m in convos]
    for spec in specs:
        name, sep, ref = (s.strip() for s in spec.partition("="))
        if not sep or not name or not ref:
            raise PrefcliError(f"--attribute {spec}: expected NAME=REWARD_MODEL", "e.g. --attribute helpful=rm")
        if name in taken or name in labels:
            raise PrefcliError(f"--attribute {spec}: attribute '{name}' is already given", "give each attribute once")
        scorer = RewardScorer(ws, ref, "--attribute", device)
        labels[name] = rank_labels(scorer(prompts, replies))
        sources[name] = f"reward model {ref} (rank)"
        parents.append(scorer.parent)
    return labels, sources, parents


# ----------------------------------------------------------------------------- the stage

def run(cfg: SteerConfig, ws: Workspace) -> dict:
    t0 = time.time()
    if not 0 <= cfg.val_fraction < 1:
        raise PrefcliError(f"--val-fraction {cfg.val_fraction} is out of range", "use a number from 0 up to 1")
    if use_demo(cfg.data):
        convos, labels, sources = demo_examples()
        inputs = demo_input("demo sft chats and train pairs, gold-judge labels")
    else:
        convos, labels, sources = data_examples(cfg.data)
        inputs = file_inputs(cfg.data)
    for m in convos:
        if m[-1]["role"] != "assistant":
            raise PrefcliError("--data: every conversation must end with the assistant reply its attributes describe",
                               "put the labelled reply last")
    policy = load_model_artifact(ws, cfg.policy, "--policy", kind="causal_lm")
    tok, model = policy.tokenizer, policy.model
    if not tok.has_chat_template:
        raise PrefcliError(f"--policy: the tokenizer of {policy.path} has no chat template", "use a tokenizer made by `prefcli tokenize`")
    rm_labels, rm_sources, rm_parents = reward_model_labels(ws, cfg.attribute, convos, "cpu", set(labels))
    labels.update(rm_labels)
    sources.update(rm_sources)
    if not labels:
        raise PrefcliError("--data: the rows have no 'attributes' and no --attribute was given",
                           'add "attributes": {"NAME": WEIGHT} to each row, or pass --attribute NAME=REWARD_MODEL')
    attributes = list(labels)
    vectors = [[labels[a][i] for a in attributes] for i in range(len(convos))]

    context = model.config.max_position_embeddings
    encoded = [(encode_chat(tok, m, context), v) for m, v in zip(convos, vectors)]
    truncated = sum(e.truncated for e, _ in encoded)
    if truncated:
        note(f"warning: {truncated} of {len(encoded)} conversations are longer than the context ({context} tokens) and were truncated")
    encoded = [(e, v) for e, v in encoded if sum(e.mask[1:]) > 0]
    if not encoded:
        raise PrefcliError("--data: no conversation has an assistant token within the context", "use shorter conversations")
    train, val = split_val(encoded, cfg.val_fraction, cfg.seed)
    label_mean = [sum(v[k] for _, v in train) / len(train) for k in range(len(attributes))]
    steering = Steering(attributes, model.config.hidden_size, sources=sources, label_mean=label_mean)
    tcfg = train_config(cfg, len(train), DEFAULT_STEPS, DEFAULT_EPOCHS, model=model)
    run_dir = prepare_run(ws, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, config=to_dict(cfg))
    pad = tok.pad_id

    # Padded, not packed, batches: one preference vector per row.
    def collate(items: list[tuple[Encoded, list[float]]]) -> dict:
        batch = pad_batch([e for e, _ in items], pad)
        batch["vectors"] = torch.tensor([v for _, v in items], dtype=torch.float32)
        return batch

    def batches(step: int, micro: int) -> dict:
        from prefcli.distributed import batch_indices

        idx = batch_indices(step, micro, cfg.batch_size, cfg.grad_accum, len(train), seed=cfg.seed)
        return collate([train[i] for i in idx])

    def forward(model, batch: dict, vectors: torch.Tensor | None = None):
        batch = {k: v.to(device) for k, v in batch.items()}
        vecs = batch["vectors"] if vectors is None else vectors.to(device)
        logits = model(batch["input_ids"], vecs, attention_mask=batch["attention_mask"])
        return lm_loss(logits, batch["input_ids"], batch["loss_mask"])

    def loss_fn(model, batch: dict):
        loss, n = forward(model, batch)
        return loss, {"tokens": int(batch["attention_mask"].sum()), "target_tokens": n}

    def eval_fn(model) -> dict:
        """Held-out loss with each reply's own labels, and with the default vector for all:
        the gap is what the labels tell the model about the reply."""
        if not val:
            return {}
        sums = {"val_loss": [0.0, 0], "val_loss_at_defaults": [0.0, 0]}
        for i in range(0, len(val), cfg.batch_size):
            batch = collate(val[i: i + cfg.batch_size])
            defaults = model.steering.defaults.expand(len(batch["vectors"]), -1)
            for key, vecs in (("val_loss", None), ("val_loss_at_defaults", defaults)):
                loss, n = forward(model, batch, vecs)
                sums[key][0] += float(loss) * int(n)
                sums[key][1] += int(n)
        return {k: s / max(c, 1) for k, (s, c) in sums.items()}

    trainer = Trainer(SteeredLM(model, steering), loss_fn, batches, tcfg, run_dir, eval_fn=eval_fn,
                      desc=f"steer {cfg.out}")
    device = trainer.device
    summary = trainer.train(resume=cfg.resume)
    trained = trainer.full_model()
    metrics = {
        "train_loss": round(summary.get("train_loss", float("nan")), 4),
        "val_loss": round(summary["val_loss"], 4) if "val_loss" in summary else None,
        "val_loss_at_defaults": round(summary["val_loss_at_defaults"], 4) if "val_loss_at_defaults" in summary else None,
        "examples": len(train),
        "val_examples": len(val),
        "truncated": truncated,
        "steps": summary["steps"],
        "tokens_per_s": round(summary["tokens_per_s"]),
    }
    steering = trained.steering.float().cpu()
    save_model_artifact(ws, cfg.out, trained.lm.float().cpu(), policy.path, kind="causal_lm", stage="align steer",
                        config=to_dict(cfg), parents=[policy.parent(), *inputs, *rm_parents], metrics=metrics,
                        overwrite=cfg.overwrite or cfg.resume, chat=True, extra_files=steering.save,
                        extra_meta={"steering": {"attributes": attributes, "defaults": steering.defaults.tolist(),
                                                 "label_mean": label_mean, "sources": sources}})
    dist.barrier()
    return {"model": cfg.out, "method": "steer", "attributes": ", ".join(attributes),
            "label_mean": ", ".join(f"{a}={m:.2f}" for a, m in zip(attributes, label_mean)), **metrics,
            "seconds": round(time.time() - t0, 2)}
