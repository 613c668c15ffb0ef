"""``HookedModel``: a Hugging Face causal LM with TransformerLens hook names.

Hooks are registered once on the underlying modules and dispatch to whatever functions are active, so entering
and leaving an intervention context costs nothing. A hook function has the TransformerLens signature
``fn(activation, hook) -> new activation | None`` (None keeps the activation). ``hook`` is a :class:`HookName`:
the hook name as a ``str`` that also has TransformerLens's ``hook.name``, so ``fn(act, name)`` code that uses the
string and ``fn(act, hook)`` code that reads ``hook.name`` both work.

Hook names (``l`` is the layer)::

    hook_embed                       [batch, pos, d_model]  token embedding (Gemma: already scaled by sqrt(d_model))
    hook_pos_embed                   [batch, pos, d_model]  GPT-2 only
    blocks.{l}.hook_resid_pre        [batch, pos, d_model]
    blocks.{l}.hook_attn_in          [batch, pos, d_model]  the attention's input (before its norm): resid_pre's
                                                            value, but edits/gradients here reach the attention only
    blocks.{l}.hook_attn_out         [batch, pos, d_model]  what the attention adds to the residual stream
    blocks.{l}.hook_resid_mid        [batch, pos, d_model]  resid_pre + attn_out
    blocks.{l}.hook_mlp_in           [batch, pos, d_model]  the MLP's input before its norm (resid_mid's value)
    blocks.{l}.ln2.hook_normalized   [batch, pos, d_model]  the MLP's norm input, normalised, *before* the norm's gain
                                                            (TransformerLens's meaning); edits are carried through
                                                            the gain (and LayerNorm bias) to the MLP
    blocks.{l}.mlp.hook_in           [batch, pos, d_model]  the MLP's actual input: the norm's output, after the gain
                                                            (what transcoders read)
    blocks.{l}.mlp.hook_post         [batch, pos, d_mlp]
    blocks.{l}.hook_mlp_out          [batch, pos, d_model]  what the MLP adds to the residual stream
    blocks.{l}.hook_resid_post       [batch, pos, d_model]
    blocks.{l}.attn.hook_z           [batch, pos, head, d_head]
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from circuit_discovery.errors import HookError, InputError
from circuit_discovery.models.arch import ArchSpec, get_module


class HookName(str):
    """A hook name passed to hook functions: a plain ``str`` with TransformerLens's ``HookPoint.name`` as well."""

    __slots__ = ()

    @property
    def name(self) -> str:
        """The hook name as a plain ``str`` (what ``hook.name`` is in TransformerLens)."""
        return str(self)


HookFn = Callable[[Tensor, HookName], Tensor | None]


@dataclass
class ModelConfig:
    model_name: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)


class _Passthrough(nn.Module):
    """Stands in for a decoder layer that is skipped (its output is replaced downstream anyway)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x, new):
    return (new,) + tuple(x[1:]) if isinstance(x, tuple) else new


def _norm_eps(module: nn.Module) -> float:
    return float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6)))


def _pre_gain_normalized(module: nn.Module, x: Tensor) -> Tensor:
    """The norm's input normalised *before* its gain, in float32 (TransformerLens's ``hook_normalized``)."""
    xf = x.float()
    if isinstance(module, nn.LayerNorm):
        xc = xf - xf.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + module.eps)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _norm_eps(module))


def _apply_gain(module: nn.Module, normalized: Tensor) -> Tensor:
    """The norm's output from its pre-gain normalised input: ``x̂ * gain (+ bias)``.

    Gemma's RMSNorms scale by ``1 + weight``; Llama/Qwen-style RMSNorms by ``weight``; LayerNorm by ``weight`` and
    add ``bias``. :func:`_check_norm_gain` verifies the rule on each module once, at registration."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.LayerNorm):
        y = normalized * w.float() if w is not None else normalized
        return y + module.bias.float() if module.bias is not None else y
    if w is None:
        return normalized
    return normalized * (1.0 + w.float()) if "Gemma" in type(module).__name__ else normalized * w.float()


def _check_norm_gain(module: nn.Module, d_model: int, where: str) -> None:
    """Refuse a norm whose output is not ``_apply_gain(_pre_gain_normalized(x))`` (unknown gain convention)."""
    p = next(module.parameters(), None)
    x = torch.randn(2, 3, d_model, generator=torch.Generator().manual_seed(0)).to(
        device=p.device if p is not None else "cpu", dtype=p.dtype if p is not None else torch.float32)
    with torch.no_grad():
        want = _first(module(x)).float()
        got = _apply_gain(module, _pre_gain_normalized(module, x))
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
        raise HookError(f"{where} ({type(module).__name__}): its output is not x_normalised * gain (+ bias), so "
                        "ln2.hook_normalized (before the gain) cannot be provided; report this architecture")


class HookedModel:
    """A Hugging Face causal LM read and changed through TransformerLens hook names."""

    def __init__(self, hf_model: nn.Module, tokenizer, spec: ArchSpec, model_name: str):
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        # A transformers ``PretrainedConfig``: its attributes depend on the architecture (``n_head`` or
        # ``num_attention_heads``, ...), so they are read dynamically.
        hc: Any = hf_model.config
        n_heads = hc.num_attention_heads if hasattr(hc, "num_attention_heads") else hc.n_head
        d_model = hc.hidden_size if hasattr(hc, "hidden_size") else hc.n_embd
        d_head = getattr(hc, "head_dim", None) or d_model // n_heads
        d_mlp = getattr(hc, "intermediate_size", None) or getattr(hc, "n_inner", None) or 4 * d_model
        n_ctx = getattr(hc, "max_position_embeddings", None) or getattr(hc, "n_positions", None) or 2048
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(hc, "bos_token_id", None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
        self.cfg = ModelConfig(
            model_name=model_name, architecture=hc.model_type,
            n_layers=hc.num_hidden_layers if hasattr(hc, "num_hidden_layers") else hc.n_layer,
            d_model=d_model, n_heads=n_heads, n_kv_heads=getattr(hc, "num_key_value_heads", None) or n_heads,
            d_head=d_head, d_mlp=d_mlp, d_vocab=hc.vocab_size, n_ctx=n_ctx, bos_token_id=bos, pad_token_id=pad,
        )
        self.softcap = getattr(hc, spec.softcap_attr, None) if spec.softcap_attr else None
        self._active: dict[str, list[HookFn]] = {}
        self._resid_pre_store: dict[int, Tensor] = {}
        self._layers: nn.ModuleList = get_module(hf_model, spec.layers)
        self._hook_names = self._build_hook_names()
        self._register()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def W_U(self) -> Tensor:
        """Unembedding [d_vocab, d_model] (rows are tokens, as in ``nn.Linear``)."""
        return get_module(self.hf_model, self.spec.unembed).weight

    @property
    def W_E(self) -> Tensor:
        """Token embedding [d_vocab, d_model] (unscaled; Gemma multiplies by sqrt(d_model) in ``hook_embed``)."""
        return get_module(self.hf_model, self.spec.embed).weight

    def hook_names(self) -> list[str]:
        return list(self._hook_names)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedModel({c.model_name!r}, arch={c.architecture}, layers={c.n_layers}, d_model={c.d_model}, "
                f"heads={c.n_heads}, device={self.device}, dtype={self.dtype})")

    # ------------------------------------------------------------------ hook registration
    def _build_hook_names(self) -> list[str]:
        names = ["hook_embed"] + (["hook_pos_embed"] if self.spec.pos_embed else [])
        for l in range(self.cfg.n_layers):
            names += [f"blocks.{l}.{n}" for n in (
                "hook_resid_pre", "hook_attn_in", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_in",
                "ln2.hook_normalized", "mlp.hook_in", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")]
        return names

    def _run_hooks(self, name: str, x: Tensor) -> Tensor:
        hook = HookName(name)
        for fn in self._active.get(name, ()):
            out = fn(x, hook)
            if out is not None:
                if out.shape != x.shape:
                    raise HookError(f"hook on {name} returned shape {tuple(out.shape)}, expected {tuple(x.shape)}")
                x = out
        return x

    def _register(self) -> None:
        spec, m = self.spec, self.hf_model

        def out_hook(name, module, args, output):
            if name not in self._active:
                return None
            return _replace_first(output, self._run_hooks(name, _first(output)))

        def in_hook(name, module, args):
            if name not in self._active:
                return None
            return (self._run_hooks(name, args[0]),) + tuple(args[1:])

        def z_hook(name, module, args):
            if name not in self._active:
                return None
            z = args[0]
            zz = self._run_hooks(name, z.view(*z.shape[:-1], self.cfg.n_heads, self.cfg.d_head))
            return (zz.reshape(z.shape),) + tuple(args[1:])

        def layer_pre(l, module, args, kwargs):
            name = f"blocks.{l}.hook_resid_pre"
            mid_active = f"blocks.{l}.hook_resid_mid" in self._active
            if name not in self._active and not mid_active:
                return None
            if args:
                h = self._run_hooks(name, args[0])
                args = (h,) + tuple(args[1:])
            else:
                h = self._run_hooks(name, kwargs["hidden_states"])
                kwargs = {**kwargs, "hidden_states": h}
            if mid_active:
                self._resid_pre_store[l] = h
            return args, kwargs

        def layer_post(l, module, args, output):
            name = f"blocks.{l}.hook_resid_post"
            if name not in self._active:
                return None
            return _replace_first(output, self._run_hooks(name, _first(output)))

        def attn_out(l, module, args, output):
            name, mid = f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_resid_mid"
            if name not in self._active and mid not in self._active:
                return None
            a = self._run_hooks(name, _first(output))
            if mid in self._active:
                # resid_mid = resid_pre + attn_out; an edit of resid_mid is carried by attn_out so that both the
                # residual branch and the MLP's norm see it.
                r = self._resid_pre_store.pop(l) + a
                r_new = self._run_hooks(mid, r)
                if r_new is not r:
                    a = a + (r_new - r)
            return _replace_first(output, a)

        def pre_gain_hook(l, module, args, output):
            name = f"blocks.{l}.ln2.hook_normalized"
            if name not in self._active:
                return None
            x_hat = _pre_gain_normalized(module, args[0])
            new = self._run_hooks(name, x_hat)
            y = _first(output)
            # y + (gain(new) - gain(x_hat)): exactly y when no hook edits (reading the hook changes nothing, in any
            # dtype), an edit carried through the gain, and gradients reach the hooked value either way
            delta = _apply_gain(module, new) - _apply_gain(module, x_hat).detach()
            return _replace_first(output, y + delta.to(y.dtype))

        get_module(m, spec.embed).register_forward_hook(partial(out_hook, "hook_embed"))
        if spec.pos_embed:
            get_module(m, spec.pos_embed).register_forward_hook(partial(out_hook, "hook_pos_embed"))
        for l, layer in enumerate(self._layers):
            layer.register_forward_pre_hook(partial(layer_pre, l), with_kwargs=True)
            layer.register_forward_hook(partial(layer_post, l))
            get_module(layer, spec.attn_out).register_forward_hook(partial(attn_out, l))
            get_module(layer, spec.mlp_out).register_forward_hook(partial(out_hook, f"blocks.{l}.hook_mlp_out"))
            ln2 = get_module(layer, spec.ln2)
            _check_norm_gain(ln2, self.cfg.d_model, f"blocks.{l}.ln2")
            ln2.register_forward_hook(partial(pre_gain_hook, l))  # registered first: mlp.hook_in sees its edits
            ln2.register_forward_hook(partial(out_hook, f"blocks.{l}.mlp.hook_in"))
            get_module(layer, spec.ln2).register_forward_pre_hook(partial(in_hook, f"blocks.{l}.hook_mlp_in"))
            get_module(layer, spec.ln1).register_forward_pre_hook(partial(in_hook, f"blocks.{l}.hook_attn_in"))
            get_module(layer, spec.z_proj).register_forward_pre_hook(partial(z_hook, f"blocks.{l}.attn.hook_z"))
            get_module(layer, spec.mlp_post_proj).register_forward_pre_hook(
                partial(in_hook, f"blocks.{l}.mlp.hook_post"))

    def check_hook_name(self, name: str) -> None:
        if name not in self._hook_names:
            close = [n for n in self._hook_names if n.split(".")[-1] == name.split(".")[-1]][:3]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise HookError(f"unknown hook {name!r} for {self.cfg.model_name} ({self.cfg.n_layers} layers).{hint} "
                            "See HookedModel.hook_names().")

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, HookFn]]):
        """Activate ``[(hook_name, fn), ...]`` for the duration of the block (several per name allowed)."""
        added = []
        try:
            for name, fn in fwd_hooks:
                self.check_hook_name(name)
                self._active.setdefault(name, []).append(fn)
                added.append((name, fn))
            yield self
        finally:
            for name, fn in reversed(added):
                fns = self._active.get(name, [])
                if fn in fns:
                    fns.remove(fn)
                if not fns:
                    self._active.pop(name, None)
            self._resid_pre_store.clear()

    @contextlib.contextmanager
    def start_at_layer(self, layer: int, resid: Tensor):
        """Run only layers ``>= layer``, starting from ``resid`` as ``blocks.{layer}.hook_resid_pre``.

        The lower layers are swapped for pass-throughs (embedding, masks and rotary tables still run: they are
        cheap). ``resid`` [batch, pos, d_model] must match the batch of token ids given to the forward call.
        """
        if not 0 <= layer < self.cfg.n_layers:
            raise InputError(f"start layer {layer} out of range 0..{self.cfg.n_layers - 1}")
        saved = [self._layers[i] for i in range(layer)]
        for i in range(layer):
            self._layers[i] = _Passthrough()
        try:
            with self.hooks([(f"blocks.{layer}.hook_resid_pre", lambda x, n: resid.to(x.dtype))]):
                yield self
        finally:
            for i, mod in enumerate(saved):
                self._layers[i] = mod

    @contextlib.contextmanager
    def block_attention(self, layers: Iterable[int], block: Tensor):
        """Forbid chosen attention edges in ``layers``: ``block`` [batch, q, k] (bool) is True where query position
        q may NOT attend to key position k (e.g. the last token to the subject tokens, Geva et al. 2023).

        Works on the attention mask the model passes to each attention module (float, bool or None), so it holds
        for eager and sdpa attention alike; every head is blocked.
        """
        block = torch.as_tensor(block, dtype=torch.bool, device=self.device)
        if block.ndim != 3:
            raise InputError(f"block must be [batch, q, k] booleans, got shape {tuple(block.shape)}")

        def pre(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            b, n = h.shape[:2]
            if block.shape != (b, n, n):
                raise InputError(f"block has shape {tuple(block.shape)}, the run has batch {b} and {n} positions")
            mask = kwargs.get("attention_mask")
            if mask is None:  # sdpa without padding: build the causal mask it would have used
                mask = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()[None, None].expand(b, 1, n, n)
            mask = mask.expand(b, *mask.shape[1:]).clone()
            if mask.dtype == torch.bool:
                mask[:, 0][block] = False
            else:
                mask[:, 0][block] = torch.finfo(mask.dtype).min
            return args, {**kwargs, "attention_mask": mask}

        handles = [get_module(self._layers[l], self.spec.attn).register_forward_pre_hook(pre, with_kwargs=True)
                   for l in layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ tokens
    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool = True, check_length: bool = True) -> Tensor:
        """Token ids [batch, pos], right-padded with the pad token; BOS prepended when ``prepend_bos``."""
        return self.tokenize(text, prepend_bos=prepend_bos, check_length=check_length)[0]

    def tokenize(self, text: str | Sequence[str], prepend_bos: bool = True,
                 check_length: bool = True) -> tuple[Tensor, Tensor]:
        """(tokens [batch, pos], attention_mask [batch, pos]), right-padded."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise InputError("no text to tokenize: pass a string or a non-empty list of strings")
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos and self.cfg.bos_token_id is not None:
            ids = [[self.cfg.bos_token_id] + i for i in ids]
        if any(len(i) == 0 for i in ids):
            raise InputError("an empty prompt has no tokens; give each prompt some text")
        n = max(len(i) for i in ids)
        if check_length and n > self.cfg.n_ctx:
            raise InputError(f"prompt of {n} tokens is longer than {self.cfg.model_name}'s context of "
                             f"{self.cfg.n_ctx} tokens; shorten it")
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        tokens = torch.full((len(ids), n), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for r, i in enumerate(ids):
            tokens[r, : len(i)] = torch.tensor(i, dtype=torch.long)
            mask[r, : len(i)] = 1
        return tokens.to(self.device), mask.to(self.device)

    def to_str_tokens(self, text_or_tokens, prepend_bos: bool = True) -> list[str]:
        if isinstance(text_or_tokens, str):
            toks = self.to_tokens(text_or_tokens, prepend_bos=prepend_bos)[0]
        else:
            toks = torch.as_tensor(text_or_tokens)
            if toks.ndim == 2:
                toks = toks[0]
        return [self.tokenizer.decode([int(t)]) for t in toks]

    def infer_attention_mask(self, tokens: Tensor) -> Tensor:
        """Mask [batch, pos]: 1 up to each row's last non-pad token (trailing pads are padding)."""
        pad = self.cfg.pad_token_id
        if pad is None:
            return torch.ones_like(tokens)
        nonpad = (tokens != pad).long()
        idx = torch.arange(tokens.shape[1], device=tokens.device)
        last = torch.where(nonpad.bool(), idx, torch.zeros_like(idx)).max(dim=1).values
        return (idx[None, :] <= last[:, None]).long()

    def _prep(self, tokens: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.shape[1] > self.cfg.n_ctx:
            raise InputError(f"{tokens.shape[1]} tokens exceed the context of {self.cfg.n_ctx}; shorten the prompt")
        tokens = tokens.to(self.device)
        mask = self.infer_attention_mask(tokens) if attention_mask is None else attention_mask.to(self.device)
        return tokens, mask

    # ------------------------------------------------------------------ forward passes
    def final_norm(self, resid: Tensor) -> Tensor:
        """The final norm applied to a residual [..., d_model]."""
        return get_module(self.hf_model, self.spec.final_norm)(resid)

    def unembed(self, normed: Tensor, token_ids: Tensor | Sequence[int] | None = None) -> Tensor:
        """Logits from normalised residuals [..., d_model]; only the rows ``token_ids`` when given.

        ``token_ids`` may be 1-D (same tokens for every row: [..., k]) or shaped like ``normed[..., 0]`` plus a
        trailing k (one set per row, gathered: [..., k]). Soft-capping is applied where the model has it.
        """
        W = self.W_U
        if token_ids is None:
            logits = normed @ W.T
        else:
            ids = torch.as_tensor(token_ids, device=W.device)
            logits = normed @ W[ids].T if ids.ndim == 1 else torch.einsum("...d,...kd->...k", normed, W[ids])
        b = getattr(get_module(self.hf_model, self.spec.unembed), "bias", None)
        if b is not None:
            logits = logits + (b if token_ids is None else b[torch.as_tensor(token_ids, device=W.device)])
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _base_forward(self, tokens: Tensor, mask: Tensor, inputs_embeds: Tensor | None = None) -> Tensor:
        base = get_module(self.hf_model, self.spec.base)
        kw = dict(attention_mask=mask, use_cache=False)
        out = base(inputs_embeds=inputs_embeds, **kw) if inputs_embeds is not None else base(input_ids=tokens, **kw)
        return out.last_hidden_state  # already final-normed

    def __call__(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Full logits [batch, pos, d_vocab]."""
        tokens, mask = self._prep(tokens, attention_mask)
        return self.unembed(self._base_forward(tokens, mask))

    forward = __call__

    def last_positions(self, mask: Tensor) -> Tensor:
        return mask.sum(dim=1) - 1

    def last_logits(self, tokens: Tensor, attention_mask: Tensor | None = None,
                    token_ids: Tensor | Sequence[int] | None = None) -> Tensor:
        """Logits at each row's last non-pad position [batch, d_vocab] (or [batch, k] for ``token_ids``)."""
        tokens, mask = self._prep(tokens, attention_mask)
        h = self._base_forward(tokens, mask)
        last = h[torch.arange(h.shape[0], device=h.device), self.last_positions(mask)]
        return self.unembed(last, token_ids)

    def run_with_cache(self, tokens: Tensor, names: Iterable[str] | str | Callable[[str], bool] | None = None,
                       attention_mask: Tensor | None = None, return_logits: bool | str = True,
                       detach: bool = True) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Run once and return ``(logits, cache)``; ``cache[name]`` holds that hook's activation.

        ``names``: a list of hook names, one name, a regex string prefixed ``re:``, a predicate, or None (all).
        ``return_logits``: True (full [batch, pos, vocab]), ``"last"`` ([batch, vocab] at the last non-pad
        position), or False (skip the unembedding: cheapest).
        """
        if names is None:
            sel = self.hook_names()
        elif callable(names):
            sel = [n for n in self._hook_names if names(n)]
        elif isinstance(names, str) and names.startswith("re:"):
            pat = re.compile(names[3:])
            sel = [n for n in self._hook_names if pat.search(n)]
        elif isinstance(names, str):
            sel = [names]
        else:
            sel = list(names)
        cache: dict[str, Tensor] = {}

        def save(x, name):
            cache[str(name)] = x.detach() if detach else x

        tokens, mask = self._prep(tokens, attention_mask)
        with self.hooks([(n, save) for n in sel]), torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            h = self._base_forward(tokens, mask)
            if return_logits == "last":
                logits = self.unembed(h[torch.arange(h.shape[0], device=h.device), self.last_positions(mask)])
            elif return_logits:
                logits = self.unembed(h)
            else:
                logits = None
        return logits, cache

    def final_hidden(self, tokens: Tensor, attention_mask: Tensor | None = None,
                     inputs_embeds: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [batch, pos, d_model] (feed to :meth:`unembed`)."""
        tokens, mask = self._prep(tokens, attention_mask)
        return self._base_forward(tokens, mask, inputs_embeds=inputs_embeds)

    def embed(self, tokens: Tensor) -> Tensor:
        """``hook_embed`` for tokens without running the model [batch, pos, d_model]."""
        return get_module(self.hf_model, self.spec.embed)(torch.as_tensor(tokens, device=self.device))


@contextlib.contextmanager
def frozen(model: HookedModel):
    """Parameters do not require grad inside the block (gradients go to activations only)."""
    params = [p for p in model.hf_model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
