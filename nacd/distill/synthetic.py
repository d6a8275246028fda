"""The synthetic set: K samples, each P learnable prompt vectors in front of a real seed sample.

Layout (one sample k):

    [ prompt_embeds[k, 0..P-1] | seed tokens seed_input_ids[k, 0..L-1] ]
                                  loss on positions where seed_labels != -100 (the response)

Every learnable vector lives in the source model's *input-embedding space*
(``nacd.models.input_embedding_matrix``, which already includes Gemma's sqrt(hidden) scale),
so the regulariser and the projection compare like with like.

With ``learnable_instruction`` the seed's instruction positions (attention 1, label -100) are
learnable too: ``instruction_embeds`` (K x L x d) starts as the embeddings of the seed tokens and
only its instruction positions are ever read (``instruction_mask``), so response tokens stay
real ids and remain the loss targets.

On disk (``save_pretrained``): ``synthetic.safetensors`` (the tensors) and ``synthetic.json``
(metadata: source model, P, distance, iteration, loss history, parameter space, seed rows).
Each file is written to a temp name and renamed; the JSON is written last, so a folder with
``synthetic.json`` is complete. Loading never unpickles.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from nacd import storage

TENSORS_FILE = "synthetic.safetensors"
META_FILE = "synthetic.json"
FORMAT_VERSION = 1
INIT_OPTIONS = ("random_vocab", "seed_tokens", "gaussian")


class SyntheticSetError(ValueError):
    pass


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    storage.write_bytes(str(path), save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                  metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@dataclass
class SyntheticSet:
    prompt_embeds: torch.Tensor  # K x P x d, learnable
    seed_input_ids: torch.Tensor  # K x L int64, right-padded
    seed_labels: torch.Tensor  # K x L int64, -100 on instruction and padding
    seed_attention_mask: torch.Tensor  # K x L int64
    log_alpha: torch.Tensor  # 0-dim, learnable student learning rate alpha = exp(log_alpha)
    instruction_embeds: torch.Tensor | None = None  # K x L x d, learnable at instruction positions
    meta: dict = field(default_factory=dict)
    # K x P int64: the token ids the prompt started from (token inits only), so the projection can
    # say how many tokens distillation actually changed
    init_prompt_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        x = self.prompt_embeds
        if x.dim() != 3:
            raise SyntheticSetError(f"prompt_embeds must be K x P x d, got shape {list(x.shape)}")
        k, p, _ = x.shape
        if k == 0:
            raise SyntheticSetError("the synthetic set is empty (K = 0): no seed samples")
        if p == 0:
            raise SyntheticSetError("prompt length P = 0: each sample needs at least one learnable vector")
        for name in ("seed_input_ids", "seed_labels", "seed_attention_mask"):
            t = getattr(self, name)
            if t.dim() != 2 or t.shape[0] != k or t.shape != self.seed_input_ids.shape:
                raise SyntheticSetError(f"{name} must be K x L = {k} x L, got {list(t.shape)}")
        if not bool((self.seed_labels != -100).any(dim=1).all()):
            bad = int((~(self.seed_labels != -100).any(dim=1)).nonzero()[0])
            raise SyntheticSetError(f"seed sample {bad} has no response token (all labels are -100)")
        if self.init_prompt_ids is not None and tuple(self.init_prompt_ids.shape) != (k, p):
            raise SyntheticSetError(f"init_prompt_ids must be K x P = {k} x {p}, got {list(self.init_prompt_ids.shape)}")
        if self.instruction_embeds is not None and (
                self.instruction_embeds.shape[:2] != self.seed_input_ids.shape
                or self.instruction_embeds.shape[2] != x.shape[2]):
            raise SyntheticSetError(f"instruction_embeds must be K x L x d = {list(self.seed_input_ids.shape)} "
                                    f"x {x.shape[2]}, got {list(self.instruction_embeds.shape)}")

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_samples(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompt_embeds.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.prompt_embeds.shape[2]

    @property
    def instruction_mask(self) -> torch.Tensor:
        """K x L bool: real (attended) positions without loss, i.e. the seed's instruction."""
        return (self.seed_labels == -100) & (self.seed_attention_mask != 0)

    def learnable_vectors(self) -> torch.Tensor:
        """Every learnable vector, n x d: all prompt vectors, then the learnable instruction ones."""
        parts = [self.prompt_embeds.reshape(-1, self.hidden_size)]
        if self.instruction_embeds is not None:
            parts.append(self.instruction_embeds[self.instruction_mask])
        return torch.cat(parts)

    def with_learnable_vectors(self, vectors: torch.Tensor) -> SyntheticSet:
        """This set with its learnable vectors replaced by ``vectors`` (n x d, in the order of
        ``learnable_vectors``), e.g. by their nearest token rows."""
        k, p, d = self.prompt_embeds.shape
        instruction = self.instruction_embeds
        n = k * p + (0 if instruction is None else int(self.instruction_mask.sum()))
        if tuple(vectors.shape) != (n, d):
            raise SyntheticSetError(f"expected {n} x {d} vectors, got {list(vectors.shape)}")
        if instruction is not None:
            instruction = instruction.detach().clone()
            instruction[self.instruction_mask] = vectors[k * p:].to(instruction.dtype)
        return replace(self, prompt_embeds=vectors[:k * p].reshape(k, p, d).to(self.prompt_embeds.dtype),
                       instruction_embeds=instruction)

    def to(self, device: torch.device | str) -> SyntheticSet:
        """The same set with every tensor on ``device``."""
        return replace(self, **{f.name: value.to(device) for f in fields(self)
                                if isinstance(value := getattr(self, f.name), torch.Tensor)})

    def prompt_tokens_changed(self, prompt_ids: torch.Tensor) -> int | None:
        """How many of ``prompt_ids`` (K*P nearest tokens of the prompt vectors, any shape) differ
        from the tokens the prompt started from; None when it did not start from tokens."""
        init = self.init_prompt_ids
        if init is None:
            return None
        return int((prompt_ids.reshape(-1)[:init.numel()] != init.reshape(-1).to(prompt_ids.device)).sum())

    def check_hidden_size(self, hidden_size: int, where: str = "model") -> None:
        if self.hidden_size != hidden_size:
            raise SyntheticSetError(f"synthetic set has hidden size {self.hidden_size} but the {where} "
                                    f"has {hidden_size}: it was made for another model")

    # ------------------------------------------------------------------ creation
    @classmethod
    def init(cls, embedding_matrix: torch.Tensor, seed_input_ids: torch.Tensor, seed_labels: torch.Tensor,
             seed_attention_mask: torch.Tensor, *, prompt_len: int, init: str = "random_vocab",
             init_std: float = 0.02, init_alpha: float = 1e-2, learnable_instruction: bool = False,
             generator: torch.Generator | None = None, exclude_ids: Sequence[int] = (),
             meta: dict | None = None) -> SyntheticSet:
        """A fresh synthetic set on the given (already padded) seeds.

        - ``random_vocab``: each prompt vector is the embedding of a uniformly drawn vocabulary
          token (``exclude_ids``, e.g. special tokens, are never drawn);
        - ``seed_tokens``: the embeddings of the seed's own first P tokens (cycled when the seed
          is shorter than P);
        - ``gaussian``: N(0, init_std^2) per coordinate.
        ``embedding_matrix`` is ``input_embedding_matrix(model)`` (V x d)."""
        if prompt_len <= 0:
            raise SyntheticSetError(f"prompt_len must be > 0 (got {prompt_len})")
        if seed_input_ids.dim() != 2 or seed_input_ids.shape[0] == 0:
            raise SyntheticSetError("empty seed set: the synthetic set needs at least one seed sample")
        if init not in INIT_OPTIONS:
            raise SyntheticSetError(f"init must be one of {INIT_OPTIONS}, got {init!r}")
        if init_alpha <= 0:
            raise SyntheticSetError(f"init_alpha must be > 0 (got {init_alpha})")
        table = embedding_matrix.detach()
        k, vocab, d = seed_input_ids.shape[0], table.shape[0], table.shape[1]
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        if init == "random_vocab":
            allowed = torch.ones(vocab, dtype=torch.bool)
            allowed[list(exclude_ids)] = False
            pool = allowed.nonzero().squeeze(1)
            ids = pool[torch.randint(len(pool), (k, prompt_len), generator=g)]
        elif init == "seed_tokens":
            rows = []
            for i in range(k):
                real = seed_input_ids[i][seed_attention_mask[i] != 0]
                rows.append(real[torch.arange(prompt_len) % len(real)])
            ids = torch.stack(rows)
        if init == "gaussian":
            ids = None
            prompt = torch.randn(k, prompt_len, d, generator=g, dtype=torch.float64).to(table.dtype) * init_std
        else:
            prompt = table[ids]
        instruction = table[seed_input_ids].clone() if learnable_instruction else None
        log_alpha = torch.tensor(math.log(init_alpha), dtype=table.dtype)
        return cls(prompt.clone(), seed_input_ids.clone(), seed_labels.clone(), seed_attention_mask.clone(),
                   log_alpha, instruction, dict(meta or {}, init=init, prompt_len=prompt_len,
                                                learnable_instruction=learnable_instruction), ids)

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompt_embeds": self.prompt_embeds, "seed_input_ids": self.seed_input_ids,
               "seed_labels": self.seed_labels, "seed_attention_mask": self.seed_attention_mask,
               "log_alpha": self.log_alpha}
        if self.instruction_embeds is not None:
            out["instruction_embeds"] = self.instruction_embeds
        if self.init_prompt_ids is not None:
            out["init_prompt_ids"] = self.init_prompt_ids
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``synthetic.safetensors`` then ``synthetic.json`` (the commit marker)."""
        directory = Path(directory)
        save_tensors(directory / TENSORS_FILE, self.tensors(), {"format": "nacd-synthetic"})
        meta = dict(self.meta, format_version=FORMAT_VERSION, num_samples=self.num_samples,
                    prompt_len=self.prompt_len, hidden_size=self.hidden_size,
                    alpha=float(self.log_alpha.exp()),
                    learnable_instruction=self.instruction_embeds is not None)
        storage.write_json(str(directory / META_FILE), meta)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SyntheticSet:
        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise SyntheticSetError(f"{directory}: not a complete synthetic set "
                                    f"({META_FILE} and {TENSORS_FILE} expected); did distill finish?")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise SyntheticSetError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                                    f"this nacd reads {FORMAT_VERSION}")
        t = load_tensors(tensor_path)
        missing = [n for n in ("prompt_embeds", "seed_input_ids", "seed_labels", "seed_attention_mask",
                               "log_alpha") if n not in t]
        if missing:
            raise SyntheticSetError(f"{tensor_path}: missing tensors {missing}")
        return cls(t["prompt_embeds"], t["seed_input_ids"], t["seed_labels"], t["seed_attention_mask"],
                   t["log_alpha"], t.get("instruction_embeds"), meta, t.get("init_prompt_ids"))


def pad_seeds(rows: Sequence[dict], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad tokenised rows (``input_ids``, ``labels``, ``attention_mask``) to one K x L batch.

    Right padding with attention 0 and label -100: under causal attention the padding never
    influences a real position, so the loss equals the unpadded one."""
    if not rows:
        raise SyntheticSetError("empty seed set: the synthetic set needs at least one seed sample")
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        if not (len(r["labels"]) == len(r["attention_mask"]) == n):
            raise SyntheticSetError(f"seed row {i}: input_ids, labels and attention_mask differ in length")
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        mask[i, :n] = torch.as_tensor(r["attention_mask"], dtype=torch.long)
    labels[mask == 0] = -100
    return ids, labels, mask
