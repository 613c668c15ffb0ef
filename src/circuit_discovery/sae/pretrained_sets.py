"""``load_transcoder_set``: the per-layer or cross-layer transcoders a feature graph replaces the MLPs with.

Sources (a local folder/file, a Hugging Face id ``owner/repo[/path][@revision]`` resolved through the local cache,
or a list of per-layer sources):

* a folder of per-layer dictionaries (SAELens folders, Gemma Scope ``params.npz``/``params.safetensors`` folders,
  sparsify hookpoint folders, ...), or a list of them: the layer of each is read from its hook;
* a **circuit-tracer** set: ``config.yaml`` (``model_name``, ``model_kind: transcoder_set | cross_layer_transcoder``,
  ``feature_input_hook``, ``feature_output_hook``, optional ``transcoders`` list, ``activation``, ``k``) with its
  per-layer files ``layer_{i}.safetensors`` (or Gemma Scope files listed in ``transcoders``), or its cross-layer
  format ``W_enc_{i}.safetensors`` + ``W_dec_{i}.safetensors``;
* a **Gemma Scope 2** per-layer set ``<site>/width_16k_l0_small[_affine]`` (the folders
  ``<site>/layer_{L}_width_16k_l0_small[_affine]`` that exist, or all that the repository has when downloading)
  and its cross-layer transcoder ``clt/<name>/params_layer_{L}.safetensors`` (+ ``config.json``).

Hooks come from the files and are returned as templates with ``{layer}`` in this project's names.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from circuit_discovery.sae.pretrained_base import (
    DictionaryFormatError,
    DictionaryNotFoundError,
    PretrainedDictionary,
    check_floating,
    check_no_extra,
    check_shapes,
    read_safetensors,
    torch_dtype,
)
from circuit_discovery.sae.pretrained_formats import (
    CIRCUIT_TRACER_CFG,
    circuit_tracer_set_layer,
    gemma_scope_2_config,
    hub_snapshot,
    load_circuit_tracer_file,
    load_gemma_scope_2_file,
    load_gemma_scope_npz,
    load_path,
    parse_hub_id,
    resolve_source,
)
from circuit_discovery.sae.pretrained_hooks import HookMapping
from circuit_discovery.sae.transcoder_set import CrossLayerTranscoder, TranscoderSet

__all__ = ["load_transcoder_set", "circuit_tracer_layer"]

CT_CFG_KEYS = {"model_name", "model_kind", "feature_input_hook", "feature_output_hook", "transcoders",
               "activation", "k", "scan"}
_LAYER_IN_NAME = re.compile(r"(?:^|[^a-z])(?:layer|layers|blocks|h)[._]?(\d+)(?:$|[^\d])")
_GS2_SET_NAME = re.compile(r"^width_\w+$")
_DICTIONARY_FILES = ("cfg.json", "sae_weights.safetensors", "sae.safetensors", "params.npz", "params.safetensors",
                     "ae.pt")


def _template(hook: str | None, layer: int, where: str) -> str:
    if hook is None:
        raise DictionaryFormatError(f"{where} does not say which hook it reads or writes; a transcoder set needs "
                                    "hooks (use a source whose files name them)")
    prefix = f"blocks.{layer}."
    if not hook.startswith(prefix):
        raise DictionaryFormatError(f"{where}: hook {hook!r} is not at layer {layer}")
    return "blocks.{layer}." + hook[len(prefix):]


def _layer_of(d: PretrainedDictionary, where: str) -> int:
    m = re.match(r"^blocks\.(\d+)\.", d.hook_in or "")
    if not m:
        raise DictionaryFormatError(f"{where}: cannot tell its layer from hook_in={d.hook_in!r}")
    return int(m.group(1))


def _per_layer_set(dicts: dict[int, PretrainedDictionary], source: str, fmt: str,
                   metadata: dict[str, Any] | None = None) -> TranscoderSet:
    if not dicts:
        raise DictionaryNotFoundError(f"{source} holds no transcoder for the requested layers")
    tins, touts = set(), set()
    for layer, d in dicts.items():
        if not d.transcoder:
            raise DictionaryFormatError(f"{source}: the layer-{layer} dictionary is an SAE ({d.hook_in}), "
                                        "not a transcoder")
        tins.add(_template(d.hook_in, layer, f"{source} layer {layer}"))
        touts.add(_template(d.hook_out, layer, f"{source} layer {layer}"))
    if len(tins) != 1 or len(touts) != 1:
        raise DictionaryFormatError(f"{source}: the layers read or write different hooks ({sorted(tins)} -> "
                                    f"{sorted(touts)}); a set uses one hook pair")
    return TranscoderSet(per_layer=dict(sorted(dicts.items())), hook_in=tins.pop(), hook_out=touts.pop(),
                         source=source, metadata={"format": fmt, **(metadata or {})})


def _want(layers: Sequence[int] | None, layer: int) -> bool:
    return layers is None or layer in layers


# ----------------------------------------------------------------------------------------------- circuit-tracer
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DictionaryFormatError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(cfg, dict):
        raise DictionaryFormatError(f"{path} must hold a mapping")
    unknown = sorted(set(cfg) - CT_CFG_KEYS)
    if unknown:
        raise DictionaryFormatError(f"{path}: field(s) {unknown} are not supported (circuit-tracer config.yaml "
                                    f"fields: {sorted(CT_CFG_KEYS)})")
    return cfg


def _ct_hooks(cfg: dict[str, Any], path: Path, model: str | None) -> tuple[str, str]:
    hooks = HookMapping(model or cfg.get("model_name"), str(path))
    out = []
    for key in ("feature_input_hook", "feature_output_hook"):
        value = cfg.get(key)
        if not isinstance(value, str) or not value:
            raise DictionaryFormatError(f"{path}: {key} is missing (a TransformerLens hook such as hook_resid_mid)")
        mapped = hooks.tl(f"blocks.0.{value}")
        assert mapped is not None
        out.append("blocks.{layer}." + mapped.removeprefix("blocks.0."))
    return out[0], out[1]


def _ct_file(entry: Any, folder: Path, allow_download: bool) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DictionaryFormatError(f"{folder / CIRCUIT_TRACER_CFG}: transcoders entries must be paths or "
                                    f"hf:// URIs, got {entry!r}")
    if entry.startswith("hf://"):
        hub = parse_hub_id(entry)
        if hub is None or not hub[1]:
            raise DictionaryFormatError(f"{folder / CIRCUIT_TRACER_CFG}: {entry!r} is not hf://owner/repo/path")
        repo_id, sub, rev = hub
        root = hub_snapshot(repo_id, rev, allow_download=allow_download, allow_patterns=[sub],
                            exists=lambda r: (r / sub).is_file())
        return root / sub
    p = Path(entry).expanduser()
    return p if p.is_absolute() else folder / p


def _ct_cfg_layers(cfg: dict[str, Any], folder: Path) -> list[int]:
    if "transcoders" in cfg:
        entries = cfg["transcoders"]
        if not isinstance(entries, list) or not entries:
            raise DictionaryFormatError(f"{folder / CIRCUIT_TRACER_CFG}: transcoders must be a non-empty list")
        return list(range(len(entries)))
    found = sorted(int(m.group(1)) for p in folder.glob("layer_*.safetensors")
                   if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name)))
    if found != list(range(len(found))) or not found:
        raise DictionaryFormatError(f"{folder}: circuit-tracer needs layer_0.safetensors ... layer_N.safetensors, "
                                    f"found layers {found}")
    return found


def circuit_tracer_layer(folder: Path, layer: int, dtype: torch.dtype | None, model: str | None = None,
                         allow_download: bool = False, cfg: dict[str, Any] | None = None) -> PretrainedDictionary:
    """Layer ``layer`` of a circuit-tracer per-layer set in ``folder`` (``config.yaml``), hooks included."""
    cfg = _read_yaml(folder / CIRCUIT_TRACER_CFG) if cfg is None else cfg
    tin, tout = _ct_hooks(cfg, folder / CIRCUIT_TRACER_CFG, model)
    hin, hout = tin.format(layer=layer), tout.format(layer=layer)
    activation, k = cfg.get("activation"), cfg.get("k")
    if "transcoders" in cfg:
        path = _ct_file(cfg["transcoders"][layer], folder, allow_download)
    else:
        path = folder / f"layer_{layer}.safetensors"
    gemma_scope = path.suffix == ".npz" or (path.suffix == ".safetensors" and _keys(path) >= {"w_enc", "w_dec"})
    if gemma_scope:
        if activation is not None or k is not None:
            raise DictionaryFormatError(f"{folder / CIRCUIT_TRACER_CFG}: activation/k given for Gemma Scope files, "
                                        "which are JumpReLU with their own thresholds")
        d = load_gemma_scope_npz(path, dtype) if path.suffix == ".npz" else \
            load_gemma_scope_2_file(path, dtype, model or cfg.get("model_name"))
        if d.hook_in is not None and (d.hook_in, d.hook_out) != (hin, hout):
            raise DictionaryFormatError(
                f"{folder / CIRCUIT_TRACER_CFG} says layer {layer} reads {hin} and writes {hout}, but {path} "
                f"(Gemma Scope's own layout/config) says {d.hook_in} -> {d.hook_out}; load the Gemma Scope "
                "folder directly")
        d.hook_in, d.hook_out = hin, hout  # files outside Gemma Scope's layout: the set's config names the hooks
        d.cfg.transcoder = True
        d.cfg.metadata.update(hook_name=hin, hook_name_out=hout)
        return d
    return load_circuit_tracer_file(path, dtype, activation=activation, k=k, hook_in=hin, hook_out=hout)


def load_one(path: Path, dtype: torch.dtype | None, model: str | None) -> PretrainedDictionary:
    """One dictionary from a resolved local path; a ``layer_N.safetensors`` of a circuit-tracer set is read with the
    set's ``config.yaml`` (hooks, activation)."""
    layer = circuit_tracer_set_layer(path) if path.is_file() else None
    if layer is not None:
        return circuit_tracer_layer(path.parent, layer, dtype, model)
    return load_path(path, dtype, model)


def _keys(path: Path) -> set[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return set(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise DictionaryFormatError(f"{path} is not a readable safetensors file: {e}") from e


def _circuit_tracer_set(folder: Path, dtype: torch.dtype | None, layers: Sequence[int] | None, model: str | None,
                        allow_download: bool, source: str) -> TranscoderSet:
    cfg = _read_yaml(folder / CIRCUIT_TRACER_CFG)
    kind = cfg.get("model_kind")
    model = model or cfg.get("model_name")
    if kind == "cross_layer_transcoder":
        tin, tout = _ct_hooks(cfg, folder / CIRCUIT_TRACER_CFG, model)
        if cfg.get("activation") is not None or cfg.get("k") is not None:
            raise DictionaryFormatError(f"{folder / CIRCUIT_TRACER_CFG}: activation/k are not supported for a "
                                        "cross-layer transcoder (circuit-tracer reads ReLU or JumpReLU from its files)")
        if "transcoders" in cfg:  # Gemma Scope 2 CLT listed file by file
            files = [_ct_file(e, folder, allow_download) for e in cfg["transcoders"]]
            return _gs2_clt(files, dtype, layers, source, model, hooks=(tin, tout))
        return _ct_clt(folder, dtype, layers, source, (tin, tout))
    if kind != "transcoder_set":
        raise DictionaryFormatError(f"{folder / CIRCUIT_TRACER_CFG}: model_kind={kind!r} is not supported "
                                    "(transcoder_set, cross_layer_transcoder)")
    dicts = {l: circuit_tracer_layer(folder, l, dtype, model, allow_download, cfg)
             for l in _ct_cfg_layers(cfg, folder) if _want(layers, l)}
    return _per_layer_set(dicts, source, "circuit_tracer", {"model_name": model})


# ----------------------------------------------------------------------------------------------- cross-layer
def _check_clt_layers(layers: Sequence[int] | None, n: int, source: str) -> None:
    if layers is not None and sorted(layers) != list(range(n)):
        raise DictionaryFormatError(f"{source} is a cross-layer transcoder over {n} layers; it is loaded whole "
                                    f"(layers={list(layers)} cannot be a subset)")


def _make_clt(W_enc: list[Tensor], b_enc: list[Tensor], thr: list[Tensor] | None, W_dec: list[Tensor],
              b_dec: list[Tensor], skip: list[Tensor] | None, dt: torch.dtype, hooks: tuple[str, str],
              source: str, relu_form: bool = True) -> CrossLayerTranscoder:
    """``relu_form``: JumpReLU as ``relu(pre) * (pre > threshold)`` (Gemma Scope); False: ``pre * (pre > threshold)``
    (circuit-tracer's, which keeps negative pre-activations above a negative threshold)."""
    n = len(W_enc)
    d_in, d_sae = (int(s) for s in W_enc[0].shape)
    d_out = int(b_dec[0].shape[0])
    kwargs: dict[str, Any] = {}
    if skip is not None:
        kwargs["skip"] = True
    with torch.device("meta"):  # no second copy of the weights: the tensors read are assigned
        jump = "jumprelu" if relu_form else "jumprelu_no_relu"
        clt = CrossLayerTranscoder(n, d_in, d_sae, d_out, activation=jump if thr is not None else "relu",
                                   hook_in=hooks[0], hook_out=hooks[1], dtype=dt, **kwargs)
    sd: dict[str, Tensor] = {"W_enc": torch.stack(W_enc), "b_enc": torch.stack(b_enc), "b_dec": torch.stack(b_dec),
                             "threshold": torch.stack(thr) if thr is not None else torch.zeros(n, d_sae)}
    sd.update({f"W_dec.{l}": W_dec[l] for l in range(n)})
    if skip is not None:
        sd["skip"] = torch.stack(skip)
    clt.load_state_dict({k: v.to(dt).contiguous() for k, v in sd.items()}, strict=True, assign=True)
    for p in clt.parameters():
        p.requires_grad_(False)
    return clt.eval()


def _ct_clt(folder: Path, dtype: torch.dtype | None, layers: Sequence[int] | None, source: str,
            hooks: tuple[str, str]) -> TranscoderSet:
    """circuit-tracer's native CLT: ``W_enc_{i}.safetensors`` (``W_enc_{i} [d_sae, d_in]``, ``b_enc_{i}``,
    ``b_dec_{i}``, optional ``threshold_{i}``) and ``W_dec_{i}.safetensors`` (``W_dec_{i} [d_sae, n - i, d_out]``)."""
    n = len(list(folder.glob("W_enc_*.safetensors")))
    if n == 0 or any(not (folder / f"W_enc_{i}.safetensors").is_file() for i in range(n)):
        raise DictionaryFormatError(f"{folder}: a circuit-tracer CLT needs W_enc_0 ... W_enc_N.safetensors")
    _check_clt_layers(layers, n, source)
    W_enc, b_enc, b_dec, W_dec, thr = [], [], [], [], []
    has_thr: bool | None = None
    for i in range(n):
        enc_path, dec_path = folder / f"W_enc_{i}.safetensors", folder / f"W_dec_{i}.safetensors"
        enc, dec = read_safetensors(enc_path), read_safetensors(dec_path)
        if f"W_enc_{i}" not in enc or enc[f"W_enc_{i}"].ndim != 2:
            raise DictionaryFormatError(f"{enc_path} lacks the matrix 'W_enc_{i}'")
        d_sae, d_in = (int(s) for s in enc[f"W_enc_{i}"].shape)
        d_out = int(enc[f"b_dec_{i}"].shape[0]) if f"b_dec_{i}" in enc else d_in
        exp = {f"W_enc_{i}": (d_sae, d_in), f"b_enc_{i}": (d_sae,), f"b_dec_{i}": (d_out,)}
        if has_thr is None:
            has_thr = f"threshold_{i}" in enc
        if has_thr:
            exp[f"threshold_{i}"] = (d_sae,)
        check_shapes(enc, exp, str(enc_path))
        check_no_extra(enc, exp, str(enc_path))
        check_shapes(dec, {f"W_dec_{i}": (d_sae, n - i, d_out)}, str(dec_path))
        check_no_extra(dec, {f"W_dec_{i}"}, str(dec_path))
        check_floating({**enc, **dec}, str(enc_path))
        W_enc.append(enc[f"W_enc_{i}"].T)
        b_enc.append(enc[f"b_enc_{i}"])
        b_dec.append(enc[f"b_dec_{i}"])
        W_dec.append(dec[f"W_dec_{i}"])
        if has_thr:
            thr.append(enc[f"threshold_{i}"])
    dt = dtype or W_enc[0].dtype
    # circuit-tracer's JumpReLU is pre * (pre > threshold): CrossLayerTranscoder's 'jumprelu' as it is
    clt = _make_clt(W_enc, b_enc, thr if has_thr else None, W_dec, b_dec, None, dt, hooks, source, relu_form=False)
    return TranscoderSet(cross_layer=clt, hook_in=hooks[0], hook_out=hooks[1], source=source,
                         metadata={"format": "circuit_tracer_clt"})


def _gs2_clt(files: list[Path], dtype: torch.dtype | None, layers: Sequence[int] | None, source: str,
             model: str | None, hooks: tuple[str, str] | None = None) -> TranscoderSet:
    """Gemma Scope 2 CLT: ``params_layer_{i}.safetensors`` with ``w_enc [d_in, d_sae]``, ``b_enc``,
    ``threshold``, ``b_dec [d_out]``, ``w_dec [d_sae, n_layers, d_out]`` (only targets ``>= i`` used) and
    optional ``affine_skip_connection [d_in, d_out]``."""
    n = len(files)
    _check_clt_layers(layers, n, source)
    cfg = gemma_scope_2_config(files[0].parent)
    if hooks is None:
        mapping = HookMapping(model or cfg.get("model_name") or _gs2_model_from_path(files[0]), source)
        pin = cfg.get("hf_hook_point_in", "model.layers.0.pre_feedforward_layernorm.output")
        pout = cfg.get("hf_hook_point_out", "model.layers.0.post_feedforward_layernorm.output")
        hin, hout = mapping.hf(re.sub(r"layers\.\d+", "layers.0", pin)), \
            mapping.hf(re.sub(r"layers\.\d+", "layers.0", pout))
        hooks = ("blocks.{layer}." + hin.removeprefix("blocks.0."), "blocks.{layer}." + hout.removeprefix("blocks.0."))
    W_enc, b_enc, b_dec, W_dec, thr = [], [], [], [], []
    skip: list[Tensor] = []
    for i, path in enumerate(files):
        t = _read_clt_layer(path, i, n)
        if ("affine_skip_connection" in t) != (len(skip) == i if i else "affine_skip_connection" in t):
            raise DictionaryFormatError(f"{path}: affine_skip_connection present in some layers only")
        W_enc.append(t["w_enc"])
        b_enc.append(t["b_enc"])
        b_dec.append(t["b_dec"])
        W_dec.append(t["w_dec"])
        # relu(pre) * (pre > threshold) == pre * (pre > max(threshold, 0)): CrossLayerTranscoder's 'jumprelu'
        thr.append(t["threshold"].clamp_min(0))
        if "affine_skip_connection" in t:
            skip.append(t["affine_skip_connection"])
    dt = dtype or W_enc[0].dtype
    clt = _make_clt(W_enc, b_enc, thr, W_dec, b_dec, skip or None, dt, hooks, source)
    return TranscoderSet(cross_layer=clt, hook_in=hooks[0], hook_out=hooks[1], source=source,
                         metadata={"format": "gemma_scope_2_clt", **{k: cfg[k] for k in ("model_name", "l0", "width")
                                                                    if k in cfg}})


def _read_clt_layer(path: Path, i: int, n: int) -> dict[str, Tensor]:
    """One ``params_layer_{i}.safetensors`` of a Gemma Scope 2 CLT, shapes checked before reading, with only the
    decoder rows for target layers ``>= i`` read (``w_dec[:, i:, :]``)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise DictionaryNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
            if len(shapes.get("w_enc", ())) != 2:
                raise DictionaryFormatError(f"{path} lacks the matrix 'w_enc'")
            d_in, d_sae = shapes["w_enc"]
            d_out = shapes["b_dec"][0] if len(shapes.get("b_dec", ())) == 1 else d_in
            exp = {"w_enc": (d_in, d_sae), "b_enc": (d_sae,), "threshold": (d_sae,), "b_dec": (d_out,),
                   "w_dec": (d_sae, n, d_out)}
            if "affine_skip_connection" in shapes:
                exp["affine_skip_connection"] = (d_in, d_out)
            check_shapes(shapes, exp, str(path))
            check_no_extra(shapes, exp, str(path))
            t = {k: f.get_tensor(k) for k in shapes if k != "w_dec"}
            t["w_dec"] = f.get_slice("w_dec")[:, i:, :]
    except (SafetensorError, OSError) as e:
        raise DictionaryFormatError(f"{path} is not a readable safetensors file: {e}") from e
    check_floating(t, str(path))
    return t


def _gs2_model_from_path(path: Path) -> str | None:
    m = re.search(r"gemma-scope-2-(\d+[mb])-(pt|it)", path.as_posix())
    return f"google/gemma-3-{m.group(1)}-{m.group(2)}" if m else None


def _gs2_clt_files(folder: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in folder.glob("params_layer_*.safetensors")
             if (m := re.fullmatch(r"params_layer_(\d+)\.safetensors", p.name))}
    if sorted(found) != list(range(len(found))):
        raise DictionaryFormatError(f"{folder}: a Gemma Scope 2 CLT needs params_layer_0 ... params_layer_N, found "
                                    f"layers {sorted(found)}")
    return [found[i] for i in range(len(found))]


# ----------------------------------------------------------------------------------------------- folders
def _gs2_layer_folders(parent: Path, name: str) -> dict[int, Path]:
    out = {}
    for p in parent.glob(f"layer_*_{name}"):
        m = re.fullmatch(rf"layer_(\d+)_{re.escape(name)}", p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def _folder_set(folder: Path, dtype: torch.dtype | None, layers: Sequence[int] | None, model: str | None,
                allow_download: bool, source: str) -> TranscoderSet:
    if (folder / CIRCUIT_TRACER_CFG).is_file():
        return _circuit_tracer_set(folder, dtype, layers, model, allow_download, source)
    if any(folder.glob("params_layer_*.safetensors")):
        return _gs2_clt(_gs2_clt_files(folder), dtype, layers, source, model)
    if (folder / "W_enc_0.safetensors").is_file():
        return _ct_clt(folder, dtype, layers, source, ("blocks.{layer}.hook_resid_mid", "blocks.{layer}.hook_mlp_out"))
    if any(folder.glob("layer_*.safetensors")):
        raise DictionaryFormatError(f"{folder}: circuit-tracer layer files without config.yaml do not say which "
                                    "hooks they read and write; add its config.yaml")
    if any((folder / name).is_file() for name in _DICTIONARY_FILES):  # the folder is one dictionary
        single = load_path(folder, dtype, model)
        return _per_layer_set({_layer_of(single, source): single}, source, single.source_format)
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    dicts: dict[int, PretrainedDictionary] = {}
    fmt = ""
    for sub in subs:
        m = _LAYER_IN_NAME.search(sub.name)
        if m and not _want(layers, int(m.group(1))):
            continue
        try:
            d = load_path(sub, dtype, model)
        except DictionaryNotFoundError:
            continue
        layer = _layer_of(d, str(sub))
        if not _want(layers, layer):
            continue
        if layer in dicts:
            raise DictionaryFormatError(f"{folder}: two dictionaries for layer {layer} ({sub.name} and another)")
        dicts[layer], fmt = d, d.source_format
    if not dicts:
        raise DictionaryNotFoundError(f"{folder} holds no transcoder set (config.yaml, params_layer_N.safetensors, "
                                      "W_enc_N.safetensors, or per-layer dictionary folders)")
    return _per_layer_set(dicts, source, fmt)


def _resolve_set_source(source: str | os.PathLike, allow_download: bool) -> Path:
    """A local folder/file for a set source; a Gemma Scope 2 per-layer set name may be virtual (its per-layer
    folders are ``layer_{L}_<name>`` next to it)."""
    path = Path(source).expanduser()
    if path.exists() or (_GS2_SET_NAME.match(path.name) and _gs2_layer_folders(path.parent, path.name)):
        return path
    s = os.fspath(source)
    hub = parse_hub_id(s) if not s.startswith((".", "/", "~")) else None
    if hub is None or not hub[1] or "/" not in hub[1] or not _GS2_SET_NAME.match(hub[1].rsplit("/", 1)[1]):
        return resolve_source(source, allow_download=allow_download)
    repo_id, sub, rev = hub
    parent, name = sub.rsplit("/", 1)

    def exists(root: Path) -> bool:
        return (root / sub).exists() or bool(_gs2_layer_folders(root / parent, name))

    root = hub_snapshot(repo_id, rev, allow_download=allow_download,
                        allow_patterns=[f"{sub}/*", f"{parent}/layer_*_{name}/*"], exists=exists)
    return root / sub


def load_transcoder_set(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    layers: Sequence[int] | None = None,
    allow_download: bool = False,
    model: str | None = None,
) -> TranscoderSet:
    """The per-layer or cross-layer transcoders of ``source`` (see the module docstring for the sources).

    ``layers``: load only these layers of a per-layer set (a cross-layer transcoder is always loaded whole).
    ``allow_download``: download from the Hugging Face Hub what the local cache lacks (only when online); by
    default nothing is downloaded. ``model``: the model name, for files that name hooks by Hugging Face module path
    and do not say which model (Gemma 2/3 normalise the MLP output again: see
    :mod:`circuit_discovery.sae.pretrained_hooks`). ``device`` defaults to CPU; ``dtype`` to the files' dtype.

    Raises :class:`DictionaryNotFoundError` or :class:`DictionaryFormatError` (one line naming the file, field
    or hook).
    """
    dt = torch_dtype(dtype)
    want = None if layers is None else sorted({int(l) for l in layers})
    if isinstance(source, (list, tuple)):
        dicts: dict[int, PretrainedDictionary] = {}
        for i, src in enumerate(source):
            d = load_one(resolve_source(src, allow_download=allow_download), dt, model)
            layer = _layer_of(d, os.fspath(src)) if d.hook_in else i
            if layer in dicts:
                raise DictionaryFormatError(f"{os.fspath(src)}: a second dictionary for layer {layer}")
            if _want(want, layer):
                dicts[layer] = d
        ts = _per_layer_set(dicts, ", ".join(os.fspath(s) for s in source[:2]) + (" ..." if len(source) > 2 else ""),
                            next(iter(dicts.values())).source_format if dicts else "")
    else:
        assert isinstance(source, (str, os.PathLike))
        src = os.fspath(source)
        path = _resolve_set_source(source, allow_download)
        if not path.exists():  # a Gemma Scope 2 per-layer set: <site>/layer_{L}_<name> next to <site>/<name>
            found = {l: p for l, p in _gs2_layer_folders(path.parent, path.name).items() if _want(want, l)}
            dicts = {l: load_gemma_scope_2_file(p / "params.safetensors", dt, model) for l, p in found.items()}
            ts = _per_layer_set(dicts, src, "gemma_scope_2")
        elif path.is_file():
            d = load_one(path, dt, model)
            ts = _per_layer_set({_layer_of(d, src): d}, src, d.source_format)
        else:
            ts = _folder_set(path, dt, want, model, allow_download, src)
    dev = device if device is not None else "cpu"
    if ts.cross_layer is not None:
        ts.cross_layer.to(dev)
    else:
        for t in ts.per_layer.values():
            t.to(dev)
    return ts
