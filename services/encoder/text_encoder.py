"""umT5-XXL text encoder: transformers' UMT5EncoderModel loaded from upstream's models_t5_umt5-xxl-enc-bf16.pth.

Upstream's T5 (`wan/modules/t5.py`) and transformers' UMT5 compute the same function (pre-RMS-norm
blocks, unscaled attention with a per-layer bucketed relative position bias, gated-GELU(tanh) FFN)
under different names; `upstream_key_map` renames one to the other. Like upstream, a prompt is
whitespace-cleaned, tokenized with </s> appended, cut at 512 tokens, and the output keeps only the
real tokens ([L, 4096]). Upstream pads to 512 and masks the padding out; running the real tokens
alone gives the same result without the padding's cost.
"""

import dataclasses
import html
import pathlib
import re
import threading

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from avatar.checkpoints import check_state_dict, load_pth
from avatar.errors import InvalidInput, WeightsError
from avatar.presets import MODEL_DIMS

TEXT_LEN = 512  # upstream text_len: tokens kept per prompt, </s> included


@dataclasses.dataclass(frozen=True)
class T5Dims:
    """Shape of an umT5 encoder; upstream's names in comments."""

    vocab: int = 256384
    dim: int = 4096  # dim
    dim_attn: int = 4096  # dim_attn = heads x head dim
    ffn: int = 10240  # dim_ffn
    heads: int = 64  # num_heads
    layers: int = 24  # num_layers
    buckets: int = 32  # num_buckets (relative positions, max distance 128)

    def config(self) -> UMT5Config:
        if self.dim_attn % self.heads:
            raise ValueError(f"attention width {self.dim_attn} is not a multiple of {self.heads} heads")
        return UMT5Config(
            vocab_size=self.vocab,
            d_model=self.dim,
            d_kv=self.dim_attn // self.heads,
            d_ff=self.ffn,
            num_heads=self.heads,
            num_layers=self.layers,
            relative_attention_num_buckets=self.buckets,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            layer_norm_epsilon=1e-6,
            is_encoder_decoder=False,
            use_cache=False,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
        )

    def build(self) -> UMT5EncoderModel:
        """The transformers model on the current default device (`torch.device("meta")`: no memory)."""
        return UMT5EncoderModel(self.config())


UMT5_XXL = T5Dims()
TINY_T5 = T5Dims(vocab=384, dim=MODEL_DIMS["tiny"].text_dim, dim_attn=32, ffn=64, heads=4, layers=2)

_BLOCK_RENAMES = {
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # GELU branch
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",  # linear branch
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
}


def _upstream_name(name: str) -> str | None:
    """transformers name -> upstream name; None for the tied copy of the embedding."""
    if name == "shared.weight":
        return "token_embedding.weight"
    if name == "encoder.embed_tokens.weight":
        return None
    if name == "encoder.final_layer_norm.weight":
        return "norm.weight"
    m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", name)
    if m and m.group(2) in _BLOCK_RENAMES:
        return f"blocks.{m.group(1)}.{_BLOCK_RENAMES[m.group(2)]}"
    raise ValueError(f"no upstream name for T5 parameter {name}")


def upstream_key_map(model: UMT5EncoderModel) -> dict[str, str]:
    """upstream name -> transformers name for every parameter of `model` (one to one)."""
    out = {}
    for name in model.state_dict():
        up = _upstream_name(name)
        if up is not None:
            out[up] = name
    return out


def expected_upstream_shapes(dims: T5Dims = UMT5_XXL) -> dict[str, tuple[int, ...]]:
    """upstream name -> shape, from the model built on the meta device."""
    with torch.device("meta"):
        model = dims.build()
    sd = model.state_dict()
    return {up: tuple(sd[name].shape) for up, name in upstream_key_map(model).items()}


def infer_dims(shapes: dict[str, tuple[int, ...]], source: str = "T5 checkpoint") -> T5Dims:
    """Reads the encoder's shape back from an upstream-layout state dict (heads from pos_embedding)."""
    try:
        vocab, dim = shapes["token_embedding.weight"]
        layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        return T5Dims(
            vocab=vocab,
            dim=dim,
            dim_attn=shapes["blocks.0.attn.q.weight"][0],
            ffn=shapes["blocks.0.ffn.fc1.weight"][0],
            heads=heads,
            layers=layers,
            buckets=buckets,
        )
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{source}: not an umT5 encoder state dict ({e})") from e


def clean_prompt(text: str) -> str:
    """Upstream's 'whitespace' cleaning: HTML entities decoded (twice), runs of whitespace collapsed.
    (Upstream also runs ftfy's mojibake repair, which only changes broken text.)"""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """An offline tokenizer for the tiny preset: one token per UTF-8 byte, T5's special ids
    (<pad> 0, </s> 1, <unk> 2) and </s> appended, like umT5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=TEXT_LEN
    )


class TextEncoder:
    """Prompt -> umT5 embeddings [L, dim] for the real tokens (at most 512)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, dims: T5Dims, max_len: int = TEXT_LEN):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.dims = dims
        self.max_len = max_len  # the DiT's text_len: 512 upstream, 16 for the tiny DiT
        # fast tokenizers set truncation state per call and fail ("Already borrowed") when shared by threads
        self._tokenizer_lock = threading.Lock()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @classmethod
    def from_upstream(
        cls,
        ckpt_path: str | pathlib.Path,
        tokenizer_dir: str | pathlib.Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        max_len: int = TEXT_LEN,
    ) -> "TextEncoder":
        """Loads models_t5_umt5-xxl-enc-bf16.pth (memory-mapped, strictly) and the tokenizer folder."""
        tokenizer = load_tokenizer(tokenizer_dir)
        sd = load_pth(ckpt_path)
        dims = infer_dims({k: tuple(v.shape) for k, v in sd.items()}, str(ckpt_path))
        with torch.device("meta"):
            model = dims.build()
        key_map = upstream_key_map(model)
        target = model.state_dict()
        check_state_dict(
            ckpt_path,
            "umT5 encoder",
            {k: tuple(v.shape) for k, v in sd.items()},
            {up: tuple(target[name].shape) for up, name in key_map.items()},
        )
        hf = {key_map[k]: v for k, v in sd.items()}
        hf["encoder.embed_tokens.weight"] = hf["shared.weight"]  # tied: one tensor, not a copy
        model.load_state_dict(hf, strict=True, assign=True)
        model.encoder.embed_tokens = model.shared
        if len(tokenizer) > dims.vocab:
            raise WeightsError(f"{tokenizer_dir}: tokenizer has {len(tokenizer)} tokens, the T5 embedding {dims.vocab}")
        return cls(model.to(device=device, dtype=dtype), tokenizer, dims, max_len)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu") -> "TextEncoder":
        """Random tiny umT5 + the byte tokenizer: needs no file."""
        return cls.random(TINY_T5, seed, device, torch.float32, byte_tokenizer(), MODEL_DIMS["tiny"].text_len)

    @classmethod
    def random(
        cls,
        dims: T5Dims = UMT5_XXL,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        tokenizer=None,
        max_len: int = TEXT_LEN,
    ) -> "TextEncoder":
        """Random weights, seeded, created in `dtype`; the byte tokenizer unless one is given.

        On the CPU transformers' own init; elsewhere the model is allocated once on the device and
        filled there: initialising 5.7 B bf16 parameters on the CPU takes minutes (seen on an H100
        host, where `avatar serve --random-weights` never got past it in 5 minutes)."""
        device = torch.device(device)
        if device.type == "cpu":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = UMT5EncoderModel._from_config(dims.config(), dtype=dtype)
            return cls(model.to(dtype=dtype), tokenizer or byte_tokenizer(), dims, max_len)
        return cls(filled_on_device(dims, seed, device, dtype), tokenizer or byte_tokenizer(), dims, max_len)

    def token_ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidInput(f"prompt must be text, got {type(prompt).__name__}")
        with self._tokenizer_lock:
            ids = self.tokenizer(
                clean_prompt(prompt), truncation=True, max_length=self.max_len, add_special_tokens=True
            )["input_ids"]
        return list(ids)

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> [L, dim] in the model dtype, on the CPU; L = real tokens incl. </s>, <= max_len."""
        ids = torch.tensor([self.token_ids(prompt)], device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return out[0].cpu()


def load_tokenizer(tokenizer_dir: str | pathlib.Path):
    tokenizer_dir = pathlib.Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise WeightsError(f"{tokenizer_dir}: tokenizer folder missing")
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for broken folders
        raise WeightsError(f"{tokenizer_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from e


def filled_on_device(dims: T5Dims, seed: int, device: str | torch.device, dtype: torch.dtype) -> UMT5EncoderModel:
    """A umT5 encoder allocated once on `device` and filled there with seeded random values."""
    with torch.device("meta"):
        model = dims.build()
    model = model.to_empty(device=device).to(dtype)
    model.encoder.embed_tokens = model.shared  # to_empty unties them; keep one tensor
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm scales
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model
