"""Network building blocks shared by every agent.

Agents never define their own MLP, ensemble or target-update code: they compose these. The critic
ensemble is one module with stacked weights, so N members cost one batched matmul per layer instead of
N Python-level forwards.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
PRECISIONS = ("fp32", "bf16")


class LayerStack(nn.Sequential):
    """nn.Sequential (same state-dict keys) whose hidden layers can run in bfloat16.

    With `bf16_hidden` set, everything before the last linear layer runs under bfloat16 autocast and
    the last linear layer (the head) and what follows it run in fp32 on fp32 activations. Weights,
    gradients and optimizer moments stay fp32. Why: hidden matmuls are most of an update's FLOPs
    (a CQL penalty pass is 30 x batch rows per member) and bf16 runs them 5-8x faster on AMX CPUs
    and tensor-core GPUs; keeping the head in fp32 keeps Q-values, log-std and TD targets at fp32
    resolution (a bf16 Q of 300 would be quantized in steps of 2).
    """

    bf16_hidden: bool = False

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """`members` (ensemble stacks only): run just those members, (len(members), B, out)."""
        call = (lambda layer, h: layer(h)) if members is None else (lambda layer, h: _member_subset(layer, h, members))
        if not self.bf16_hidden:
            for layer in self:
                x = call(layer, x)
            return x
        head = max(i for i, layer in enumerate(self) if isinstance(layer, (nn.Linear, EnsembleLinear)))
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            for layer in self[:head]:
                x = call(layer, x)
        x = x.float()
        for layer in self[head:]:
            x = call(layer, x)
        return x


def _member_subset(layer: nn.Module, x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, (EnsembleLinear, _EnsembleLayerNorm)):
        return layer.forward_members(x, members)
    return layer(x)


def set_precision(module: nn.Module, precision: str) -> None:
    """`fp32` (default) or `bf16`: hidden layers of every MLP inside `module` in bfloat16 (see LayerStack)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for sub in module.modules():
        if isinstance(sub, LayerStack):
            sub.bf16_hidden = precision == "bf16"


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
    layer_norm: bool = False,
    dropout: float = 0.0,
    output_activation: nn.Module | None = None,
    layer_norm_eps: float = 1e-5,
) -> LayerStack:
    """Plain MLP: Linear -> [LayerNorm] -> act -> [Dropout] per hidden layer, then a Linear head.
    `layer_norm_eps`: PyTorch's 1e-5 by default; flax's LayerNorm (the official JAX codes) uses 1e-6."""
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers.append(nn.Linear(last, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width, eps=layer_norm_eps))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        last = width
    layers.append(nn.Linear(last, out_dim))
    if output_activation is not None:
        layers.append(output_activation)
    return LayerStack(*layers)


def _linear_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Linear, EnsembleLinear))]


def _orthogonal_(layer: nn.Module, gain: float) -> None:
    """Orthogonal weights (every ensemble member its own draw) and zero bias, as flax's Dense with
    `orthogonal(gain)`. An nn.Linear stores the transpose of a flax kernel; a Haar-orthogonal matrix and its
    transpose have the same distribution, so the draw is the official one either way."""
    with torch.no_grad():
        weights = [layer.weight] if isinstance(layer, nn.Linear) else list(layer.weight)
        for weight in weights:
            nn.init.orthogonal_(weight, gain)
        layer.bias.zero_()


def scale_last_hidden_layer(net: nn.Module, scale: float, orthogonal: bool = False) -> None:
    """WSRL's `kernel_scale_final`: re-initialize the last *hidden* layer (not the output head) at `scale`.

    WSRL's MLP builds that layer with its initializer at that scale and zero bias. Its locomotion configs
    leave `kernel_init_type` unset, which is orthogonal (wsrl/common/initialization.py `init_fns[None]`):
    `orthogonal=True` draws orthogonal(scale). Otherwise jaxrl_m's variance_scaling(scale, "fan_avg",
    "uniform"), the initializer of WSRL's IQL configs: U(-b, b), b = sqrt(3 * scale / fan_avg).
    Every ensemble member gets its own draw.
    """
    linears = _linear_layers(net)
    if len(linears) < 2:
        raise ValueError("final_layer_scale needs a network with at least one hidden layer")
    layer = linears[-2]
    if orthogonal:
        _orthogonal_(layer, scale)
        return
    fan_in, fan_out = (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else layer.weight.shape[-2:]
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        layer.bias.zero_()


def orthogonal_init(net: nn.Module, head_scale: float | None = None, hidden_scale: float = math.sqrt(2.0)) -> None:
    """The official JAX codes' MLP initialization: orthogonal(sqrt 2) kernels and zero biases on every hidden
    layer, and the output layer orthogonal(head_scale) (None: sqrt 2 as well).

    JaxCQL / Cal-QL (`orthogonal_init=True`, JaxCQL/model.py FullyConnectedNetwork): heads orthogonal(1e-2).
    WSRL (wsrl/networks/mlp.py and actor_critic_nets.py, `kernel_init_type=None`): heads orthogonal(sqrt 2).
    WSRL's policy has separate mean and log-std heads where orl has one layer with both outputs: drawn as one
    orthogonal matrix, every row has the official distribution (the rows are also mutually orthogonal,
    which two separate 256-dimensional draws nearly are).
    """
    linears = _linear_layers(net)
    for layer in linears[:-1]:
        _orthogonal_(layer, hidden_scale)
    _orthogonal_(linears[-1], hidden_scale if head_scale is None else head_scale)


class EnsembleLinear(nn.Module):
    """`ensemble_size` independent Linear layers evaluated with one batched matmul.

    Input (B, in) is shared by all members; input (E, B, in) gives each member its own batch.
    Output is always (E, B, out).
    """

    def __init__(self, in_dim: int, out_dim: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_dim))
        # Same init as nn.Linear, member by member.
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            # A shared input: broadcast it (a view, no copy) so the bias add stays fused in baddbmm.
            x = x.expand(self.weight.shape[0], *x.shape)
        return torch.baddbmm(self.bias, x, self.weight)

    def forward_member(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Only one member's output, (B, out): half the FLOPs of a full pass for a 2-member critic."""
        return torch.addmm(self.bias[member], x, self.weight[member])

    def forward_members(self, x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Only the members at `members` (repeats allowed), (len(members), B, out)."""
        weight = self.weight[members]
        if x.dim() == 2:
            x = x.expand(weight.shape[0], *x.shape)
        return torch.baddbmm(self.bias[members], x, weight)


class EnsembleMLP(nn.Module):
    """N MLPs with identical shapes, vectorized. forward: (B, in) or (E, B, in) -> (E, B, out).

    `shared_head`: the members share one output layer on top of their own hidden layers, as WSRL's critic
    (zhouzypaul/wsrl: `ensemblize` wraps only the MLP backbone; the Critic's Dense(1) is applied to the
    stacked (E, B, 256) features, so one kernel and bias serve every member).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        ensemble_size: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        layer_norm: bool = False,
        shared_head: bool = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.ensemble_size = ensemble_size
        layers: list[nn.Module] = []
        last = in_dim
        for width in hidden:
            layers.append(EnsembleLinear(last, width, ensemble_size))
            if layer_norm:
                # LayerNorm normalizes the last dim; its affine params are shared across members,
                # which matches a per-member LN up to the (identical) initialization.
                layers.append(_EnsembleLayerNorm(width, ensemble_size, layer_norm_eps))
            layers.append(ACTIVATIONS[activation](inplace=True) if activation in ("relu", "leaky_relu") else ACTIVATIONS[activation]())
            last = width
        layers.append(nn.Linear(last, out_dim) if shared_head else EnsembleLinear(last, out_dim, ensemble_size))
        self.net = LayerStack(*layers)

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """All members, or only `members` (e.g. WSRL's 2 sub-sampled ones: a fifth of a 10-member pass)."""
        return self.net(x, members)

    def forward_member(self, x: torch.Tensor, member: int) -> torch.Tensor:
        for layer in self.net:
            if isinstance(layer, (EnsembleLinear, _EnsembleLayerNorm)):
                x = layer.forward_member(x, member)
            else:
                x = layer(x)
        return x


class _EnsembleLayerNorm(nn.Module):
    """LayerNorm with separate affine parameters per ensemble member."""

    def __init__(self, width: int, ensemble_size: int, eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ensemble_size, 1, width))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), eps=self.eps) * self.weight + self.bias

    def forward_member(self, x: torch.Tensor, member: int) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), self.weight[member, 0], self.bias[member, 0], eps=self.eps)

    def forward_members(self, x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), eps=self.eps) * self.weight[members] + self.bias[members]


class Critic(nn.Module):
    """Q(s, a) ensemble. Returns (E, B) Q-values in one forward pass."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        ensemble_size: int = 2,
        hidden: Sequence[int] = (256, 256),
        layer_norm: bool = False,
        activation: str = "relu",
        shared_head: bool = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.ensemble_size = ensemble_size
        self.net = EnsembleMLP(obs_dim + action_dim, 1, ensemble_size, hidden, activation, layer_norm, shared_head, layer_norm_eps)

    def forward(self, obs: torch.Tensor, action: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """(E, B) Q-values, or (len(members), B) for a subset of members."""
        return self.net(torch.cat([obs, action], dim=-1), members).squeeze(-1)

    def q_member(self, obs: torch.Tensor, action: torch.Tensor, member: int = 0) -> torch.Tensor:
        """Q of one member, (B,). TD3-style actor losses use Q_1 only."""
        return self.net.forward_member(torch.cat([obs, action], dim=-1), member).squeeze(-1)


class ValueNet(nn.Module):
    """V(s): a single MLP returning (B,)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256), layer_norm: bool = False):
        super().__init__()
        self.net = mlp(obs_dim, 1, hidden, layer_norm=layer_norm)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class DeterministicActor(nn.Module):
    """a = max_action * tanh(f(s)) (TD3, TD3+BC, A2PR, BC)."""

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256),
        max_action: float = 1.0,
        dropout: float = 0.0,
        layer_norm: bool = False,
    ):
        super().__init__()
        self.max_action = max_action
        self.net = mlp(obs_dim, action_dim, hidden, dropout=dropout, layer_norm=layer_norm)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self.net(obs))


class GaussianActor(nn.Module):
    """Unsquashed Gaussian with a tanh-bounded mean (or an unbounded one: tanh_mean=False, CORL's AWAC) and a
    state-independent log-std (IQL, AWAC).

    log pi(a|s) is summed over action dimensions. The log-std is clipped to `log_std_bounds`: by default
    [-10, 2], policy.py's LOG_STD_MIN / LOG_STD_MAX (ikostrikov/implicit_q_learning; jaxrl's AWAC keeps
    them); the IQL learners (IQL's learner.py, FamO2O's family_learner.py) pass log_std_min=-5.
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256),
        max_action: float = 1.0,
        dropout: float = 0.0,
        log_std_bounds: tuple[float, float] = (-10.0, 2.0),
        init_log_std: float = 0.0,
        tanh_mean: bool = True,
    ):
        super().__init__()
        self.max_action, self.tanh_mean = max_action, tanh_mean
        self.net = mlp(obs_dim, action_dim, hidden, dropout=dropout)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))
        self.log_std_bounds = log_std_bounds

    def mean(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self.net(obs)) if self.tanh_mean else self.net(obs)

    def bounded_log_std(self) -> torch.Tensor:
        """The log-std as the policy uses it: the parameter clipped to log_std_bounds."""
        return self.log_std.clamp(*self.log_std_bounds)

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean = self.mean(obs)
        std = self.bounded_log_std().exp().expand_as(mean)
        return torch.distributions.Normal(mean, std, validate_args=False)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return _normal_log_prob(action, self.mean(obs), self.bounded_log_std()).sum(-1)

    def forward(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        dist = self.distribution(obs)
        action = dist.mean if deterministic else dist.sample()
        return action.clamp(-self.max_action, self.max_action)


class TanhGaussianActor(nn.Module):
    """SAC-style tanh-squashed Gaussian with state-dependent log-std.

    `sample` returns a reparameterized action and its log-probability (summed over action dims,
    with the tanh change-of-variables correction).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (256, 256),
        max_action: float = 1.0,
        layer_norm: bool = False,
        log_std_bounds: tuple[float, float] = (-5.0, 2.0),
        log_std_offset: float | None = None,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.max_action = max_action
        self.action_dim = action_dim
        self.net = mlp(obs_dim, 2 * action_dim, hidden, layer_norm=layer_norm, layer_norm_eps=layer_norm_eps)
        self.log_std_bounds = tuple(log_std_bounds)
        if log_std_offset is not None:
            # JaxCQL / Cal-QL's TanhGaussianPolicy: log-std = m * raw + b, m and b learnt scalars (Scalar
            # modules, init 1 and log_std_offset), then clipped.
            self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
            self.log_std_offset = nn.Parameter(torch.tensor(float(log_std_offset)))

    def _mean_log_std(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        if hasattr(self, "log_std_offset"):
            log_std = self.log_std_multiplier * log_std + self.log_std_offset
        return mean, log_std.clamp(*self.log_std_bounds)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self._mean_log_std(obs)
        std = log_std.exp()
        pre_tanh = mean + std * torch.randn_like(mean)
        log_prob = _normal_log_prob(pre_tanh, mean, log_std) - _tanh_log_det(pre_tanh)
        return self.max_action * torch.tanh(pre_tanh), log_prob.sum(-1)

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        mean, log_std = self._mean_log_std(obs)
        unit = (action / self.max_action).clamp(-1 + eps, 1 - eps)
        pre_tanh = torch.atanh(unit)
        return (_normal_log_prob(pre_tanh, mean, log_std) - _tanh_log_det(pre_tanh)).sum(-1)

    def forward(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        if deterministic:
            mean, _ = self._mean_log_std(obs)
            return self.max_action * torch.tanh(mean)
        return self.sample(obs)[0]


_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mean) / log_std.exp()).pow(2) - log_std - _LOG_SQRT_2PI


def _tanh_log_det(pre_tanh: torch.Tensor) -> torch.Tensor:
    # log(1 - tanh(x)^2), written stably: 2 * (log 2 - x - softplus(-2x)).
    return 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * source, as one fused foreach op."""
    target_params = list(target.parameters())
    source_params = list(source.parameters())
    torch._foreach_lerp_(target_params, source_params, tau)


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Let gradients flow through a module's *inputs* without accumulating into its parameters.

    Used wherever a loss must differentiate through a network it must not update (Q(s, pi(s)) in
    actor losses, FamO2O's balance loss through pi_u, A2PR's VAE target).
    """
    params = [p for m in modules for p in m.parameters()]
    states = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in zip(params, states):
            p.requires_grad_(state)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Run modules in eval mode (no dropout) and restore each one's mode after (a loss or diagnostic that reads a
    network the official code applies with training=False)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def cosine_to_floor(optimizer: torch.optim.Optimizer, decay_steps: int, floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(t) = lr * (floor + (1 - floor) * 0.5 * (1 + cos(pi * min(t, T) / T))): optax's cosine_decay_schedule.

    Unlike torch's CosineAnnealingLR, which is periodic past T_max (the rate climbs back up), this ends
    at `floor * lr` after `decay_steps` and stays there, as the official IQL schedule does.
    """
    horizon = max(int(decay_steps), 1)

    def factor(step: int) -> float:
        progress = min(step, horizon) / horizon
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam with the fastest implementation the device supports (fused on CPU and CUDA)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)
