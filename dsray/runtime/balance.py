"""Bias-update rules for auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2408.15664). Pure numpy.

Shape legend: L MoE layers (forward order), E routed experts. After each training step the Router
hands `BiasUpdater.update` the step's global counts c_LE and the fp32 bias b_LE the step routed with,
and gets the bias for the next step back. The bias only selects experts (see dsray/model/moe.py), so
a constant added to a layer's bias changes nothing; only differences between experts matter.

With m = mean_e(c) per layer, the rules are

    sign   b += gamma * sign(m - c)                        (the paper's rule; dsray's default before)
    prop   b += gamma * (m - c) / m                        (normalised proportional step)
    rprop  b += s * sign(m - c),  s per (layer, expert):   (adaptive step, Rprop-like)
           s *= up while sign(m - c) repeats, s *= down when it flips, s clipped to [s_min, s_max]

Why `prop` with gamma = 3e-2 is the default (numbers in docs/balance.md): the gate learns with AdamW,
whose step moves every gate weight by about lr whatever the batch size: at lr 3e-3 one optimizer step
takes a bias fitted to held-out text from MaxVio ~0.04 to ~0.1, and with no bias the gate sends nearly
every token to one expert within ~10 steps. The bias has to keep up with that drift.

`prop` is an integral controller on the relative error: over any window of n steps, per expert,
    sum_t (m_t - c_t) / m_t = (bias_end - bias_start) / gamma,
so with a fixed batch the window's relative imbalance is the bias movement over gamma * n (the
Router's 50-step MaxVio), and the step shrinks as the error does. `sign` moves every expert by
+-gamma on every step, balanced or not, so the bias chatters; raising gamma to keep up with the gate
raises the chatter, which is what a held-out pass with the final bias sees. `rprop` shrinks its
steps on the sign flips that noisy counts cause at balance and then falls behind the gate.

The gate's drift per step scales with lr: with an lr schedule, pass gamma * lr_t / lr_0 to `update`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RULES = ("sign", "prop", "rprop")
# Chosen on the debug preset at lr 3e-3, batch 4..64 (docs/balance.md): window MaxVio <= 0.1 at every
# batch size and seed measured, val loss within noise of gamma = 0.
DEFAULT_RULE = "prop"
# gamma when none is given, per rule: each rule's best measured value (sign: the smallest gamma that
# kept the window MaxVio <= 0.1 at batch 4..64; rprop: its starting step).
DEFAULT_GAMMAS = {"sign": 1.5e-2, "prop": 3e-2, "rprop": 1e-3}
DEFAULT_GAMMA = DEFAULT_GAMMAS[DEFAULT_RULE]
_RPROP_DEFAULTS = {"up": 1.2, "down": 0.5, "s_min": 1e-4, "s_max": 3e-2}


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"BiasUpdater.{name}={v!r}: expected a finite number > 0")
    return float(v)


class BiasUpdater:
    """One rule, its parameters and (for `rprop`) its per-expert state; `state_dict` is plain JSON.

    gamma = 0 turns balancing off for every rule (the bias stays as it is); None takes the rule's
    DEFAULT_GAMMAS entry. For `rprop`, gamma is the starting step size of every expert; `up`, `down`,
    `s_min`, `s_max` may be passed as keywords.
    """

    def __init__(self, n_layers: int, n_experts: int, rule: str = DEFAULT_RULE, gamma: float | None = None,
                 **params: float) -> None:
        for name, v in (("n_layers", n_layers), ("n_experts", n_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"BiasUpdater.{name}={v!r}: expected an int >= 0")
        if rule not in RULES:
            raise ValueError(f"BiasUpdater.rule={rule!r}: expected one of {RULES}")
        gamma = DEFAULT_GAMMAS[rule] if gamma is None else gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"BiasUpdater.gamma={gamma!r}: expected a finite number >= 0 (0 disables)")
        allowed = _RPROP_DEFAULTS if rule == "rprop" else {}
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"BiasUpdater: unknown parameter(s) {unknown} for rule {rule!r}; "
                             f"expected a subset of {sorted(allowed)}")
        self.n_layers, self.n_experts, self.rule, self.gamma = n_layers, n_experts, rule, float(gamma)
        self.params = {k: _positive(k, params.get(k, d)) for k, d in allowed.items()}
        if rule == "rprop":
            p = self.params
            if not p["down"] < 1 < p["up"]:
                raise ValueError(f"BiasUpdater: rprop needs down < 1 < up, got down={p['down']!r} up={p['up']!r}")
            if p["s_min"] > p["s_max"]:
                raise ValueError(f"BiasUpdater: rprop needs s_min <= s_max, got s_min={p['s_min']!r} "
                                 f"s_max={p['s_max']!r}")
        shape = (n_layers, n_experts)
        # rprop state: the step size and the last error sign of each (layer, expert)
        start = min(max(self.gamma, self.params.get("s_min", 0.0)), self.params.get("s_max", math.inf))
        self.step_LE = np.full(shape, start, np.float64)
        self.last_sign_LE = np.zeros(shape, np.int8)
        self.updates = 0

    def update(self, bias_LE: np.ndarray, counts_LE: np.ndarray, gamma: float | None = None) -> np.ndarray:
        """The bias for the next step (fp32, a new array), from this step's bias and global counts.

        `gamma` overrides the step size for this call only (e.g. scaled with an lr schedule)."""
        shape = (self.n_layers, self.n_experts)
        bias = np.asarray(bias_LE, dtype=np.float32)
        c = np.asarray(counts_LE)
        if bias.shape != shape or c.shape != shape:
            raise ValueError(f"BiasUpdater.update: bias {bias.shape} and counts {c.shape} must both be {shape}")
        if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
            raise ValueError(f"BiasUpdater.update: counts must be integers >= 0, got dtype {c.dtype}, "
                             f"min {c.min() if c.size else 0}")
        g = self.gamma if gamma is None else gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"BiasUpdater.update: gamma={g!r}: expected a finite number >= 0")
        self.updates += 1
        if g == 0:
            return bias.copy()
        mean = c.mean(axis=1, keepdims=True)
        if self.rule == "sign":
            # exactly the Router's original arithmetic: an fp32 step added to the fp32 bias
            return bias + (g * np.sign(mean - c)).astype(np.float32)
        if self.rule == "prop":
            # a layer that routed nothing has no error to correct
            err = np.divide(mean - c, mean, out=np.zeros(shape), where=mean > 0)
            return bias + (g * err).astype(np.float32)
        sign = np.sign(mean - c).astype(np.int8)
        p, agree = self.params, sign * self.last_sign_LE
        self.step_LE = np.clip(np.where(agree > 0, self.step_LE * p["up"],
                                        np.where(agree < 0, self.step_LE * p["down"], self.step_LE)),
                               p["s_min"], p["s_max"])
        self.last_sign_LE = sign
        return bias + (self.step_LE * sign).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        """Rule, parameters and per-expert state as JSON-serialisable Python values."""
        return {"rule": self.rule, "gamma": self.gamma, "params": dict(self.params), "n_layers": self.n_layers,
                "n_experts": self.n_experts, "updates": self.updates, "step": self.step_LE.tolist(),
                "last_sign": self.last_sign_LE.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BiasUpdater:
        self = cls(int(state["n_layers"]), int(state["n_experts"]), state["rule"], state["gamma"], **state["params"])
        self.load_state_dict(state)
        return self

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` wrote; the rule and the shapes must match this updater's."""
        mine = (self.rule, self.n_layers, self.n_experts)
        theirs = (state.get("rule"), state.get("n_layers"), state.get("n_experts"))
        if mine != theirs:
            raise ValueError(f"BiasUpdater.load_state_dict: state is for (rule, layers, experts)={theirs}, "
                             f"this updater is {mine}")
        step = np.asarray(state["step"], dtype=np.float64)
        last = np.asarray(state["last_sign"], dtype=np.int8)
        if step.shape != self.step_LE.shape or last.shape != self.last_sign_LE.shape:
            raise ValueError(f"BiasUpdater.load_state_dict: step {step.shape} / last_sign {last.shape}, "
                             f"expected {self.step_LE.shape}")
        self.gamma, self.params = float(state["gamma"]), {k: float(v) for k, v in state["params"].items()}
        self.step_LE, self.last_sign_LE, self.updates = step, last, int(state["updates"])
