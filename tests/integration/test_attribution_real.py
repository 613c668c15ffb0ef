"""The attribution engine on the built-in Gemma 3 270M: IG completeness, agreement with Captum, exact patching.

Few and small (2 facts of 7 tokens) so the suite stays fast on 2 cores."""
import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(real_model):
    from circuit_discovery.attribution import PairInputs
    from circuit_discovery.facts import build_pairs, group_by_length, load_builtin

    pairs = [p for p in build_pairs(load_builtin("capital_city"), real_model.tokenizer, seed=0)
             if p.corruption == "subject_swap" and p.first_token_differs]
    groups = group_by_length(pairs)
    group = groups[max(groups, key=lambda k: len(groups[k]))]
    return PairInputs.from_pairs(real_model, group[:2])


def test_ig_completeness_and_captum_agreement(real_model, inputs):
    from captum.attr import LayerIntegratedGradients

    from circuit_discovery.attribution import integrated_gradients, layer_integrated_gradients
    from circuit_discovery.models import frozen

    m = real_model
    L = m.cfg.n_layers // 2
    scores, delta = integrated_gradients(m, inputs, f"blocks.{L}.hook_resid_pre", n_steps=64,
                                         method="gausslegendre", return_convergence_delta=True)
    diff = scores.clean_metric - scores.corrupted_metric
    assert (diff.abs() > 0.5).all()
    assert ((torch.nansum(scores.values, 1) - diff).abs() <= 0.01 * diff.abs()).all(), (delta, diff)

    hf, a, c = m.hf_model, inputs.clean.answer_first, inputs.clean.cf_first

    def forward(ids, a, c):
        logits = hf(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]
        r = torch.arange(ids.shape[0])
        return logits[r, a] - logits[r, c]

    with frozen(m):
        ref = LayerIntegratedGradients(forward, m._layers[L]).attribute(
            inputs=inputs.clean.tokens, baselines=inputs.corrupted.tokens, additional_forward_args=(a, c),
            n_steps=16, method="gausslegendre", internal_batch_size=32, attribute_to_layer_input=True)
    ours = layer_integrated_gradients(m, inputs, f"blocks.{L}.hook_resid_pre", n_steps=16, method="gausslegendre",
                                      internal_batch_size=32)
    err = ((ours - ref.double()).abs().max() / ref.abs().max()).item()
    assert err <= 1e-3, err


def test_exact_patching_and_attribution_patching(real_model, inputs):
    from circuit_discovery.attribution import activation_patching, attribution_patching

    m = real_model
    layers = [0, m.cfg.n_layers // 2]
    full = activation_patching(m, inputs, ("resid_pre",), layers=layers, positions="all")
    for j in range(len(full.nodes)):  # restoring the whole residual restores the clean run
        torch.testing.assert_close(full.values[:, j] + full.corrupted_metric, full.clean_metric, atol=1e-3,
                                   rtol=1e-4)
    exact = activation_patching(m, inputs, ("resid_pre", "mlp_out"), layers=layers)
    ap = attribution_patching(m, inputs, ("resid_pre", "mlp_out"), layers=layers)
    assert ap.nodes == exact.nodes
    from scipy.stats import spearmanr

    ok = ~torch.isnan(exact.values.flatten())
    rho = spearmanr(ap.values.flatten()[ok].numpy(), exact.values.flatten()[ok].numpy()).statistic
    assert rho > 0.5, rho
