"""Target propagation (TP), difference target propagation (DTP) and their feedback learning.

Every layer gets a target and minimises its own local loss 1/2 ||t_l - h_l||^2 in W_l only:

    t_L     = f - beta dloss/df                              (output target)
    TP:  t_{l-1} = g_l(t_l)         DTP:  t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)      (h_L = f)
    grad W_l = -mean_batch((J_l^T (t_l - h_l)) a_{l-1}^T)     J_l = d h_l / d u_l  (phi', pooling)
    grad W_L = -mean_batch((t_L - f) a_{L-1}^T)

Feedback g_l (layer l -> layer l-1), ``feedback=``:

* ``"ridge"``   - the paper's theory: linear feedback at its ridge optimum for the batch,
  Q_l = H_{l-1} (H_l^T H_l + mu_l I)^{-1} H_l^T (columns are samples), mu_l = ridge * n_l, so the
  ridge grows like the width for hidden layers and stays Theta(1) at the output.
  Applied through the B x B Gram matrix (Cholesky); Q is never formed.
* ``"linear"`` / ``"trainable"`` - trainable g_l(a) = V_l a + c_l, or phi(V_l a + c_l), learned
  every batch (``fb_iters`` steps, noise ``sigma``) before the targets are computed, with
  ``fb_loss``: ``"rec"`` (DTP, Lee et al. 2015) ||g(f(h + xi)) - (h + xi)||^2 / 2,
  ``"drl"`` (difference reconstruction, Meulemans et al. 2020)
  ||g(f(h + xi)) - g(f(h)) - xi||^2 / 2, or ``"ldrl"`` (local DRL, Ernoult et al. 2022)
  -xi . (g(f(h + xi)) - g(f(h))) + ||g(f(h) + eta) - g(f(h))||^2 / 2.
  Explicit gradients; feedback weights have their own exponents (Parameterization.feedback_b/_c;
  g_L reads the fixed-size output: role "input", hidden g_l: role "hidden").
  Each loss is a batch mean of per-sample losses; a convolutional g_l (the CNN's ``UpConvFeedback``, a residual
  CNN block's ``ConvFeedbackBranch``) takes the per-sample loss as a mean over the P_l positions (pixels) of its
  output map, the channels summed at each: (1/B) sum_b (1/P_l) sum_p 1/2 ||r_{b,:,p}||^2 for rec (r the residual
  above). A conv weight is shared by all P_l positions, so the summed loss's gradient grows like P_l (196 on
  14 x 14 maps) and the feedback LR would mean another thing than on an MLP; dense feedback (P_l = 1, including
  the residual CNN's g_L onto the flattened stream) keeps the sum over its coordinates. Cells with trained conv
  feedback record it (``TP.cell_facts``: ``conv_fb_loss``), so stores written with the summed loss are not reused.
  The noise xi (and eta) comes from ``noise_rng``: ``"host"`` draws it replica by replica from
  CPU generators (stream ``feedback_noise``) and copies it to the device (every result drawn on a CPU);
  ``"counter"`` draws it for all replicas at once on the net's device with
  ``streams.counter_normal`` (stream ``feedback_noise_counter``, one counter per draw): no per-replica
  loop and no host copy, for GPUs. ``"auto"`` (default, :func:`resolve_noise_rng`): counter on a CUDA net,
  host elsewhere; the generator a run used is in its history rows (``noise_rng``).
* ``"inverse"`` - the exact (pseudo-)inverse of W_l, for linear networks: the oracle that makes
  DTP equal Gauss-Newton targets.

Residual nets (``Net.residual_net``: ``ResMLP``, ``ResCNN``; docs/depth.md). Targets live on the residual stream
h_l = u_l (l = 1..L-1; u_l = u_{l-1} + a_l (W_l phi(u_{l-1}) + b_l) for a block), so a layer's local loss
1/2 ||t_l - u_l||^2 has grad W_l = -mean_batch((t_l - u_l) a_{l-1}^T) (times the layer's multipliers, a_l
included: no phi'). The feedback of a block mirrors it, an identity path plus a branch with the block's
depth factors (``Parameterization.feedback_rule(..., residual=True)``):

    g_l(t) = t + a_l (V_l phi(t) + c_l)    ("trainable")      g_l(t) = t + a_l (V_l t + c_l)   ("linear")

so DTP's difference t_{l-1} - h_{l-1} = (t_l - h_l) + a_l (V_l phi(t_l) - V_l phi(h_l)) passes the output
signal down the identity path, as backprop does; g_L(f) = V_L f + c_L (linear: the stream is unbounded),
reshaped to the stream. The feedback losses are unchanged with f_l(h) = h + a_l (W_l phi(h) + b_l). Ridge: a
block regresses the branch, Q_l r = r + (H_{l-1} - H_l)^T-fit r (the identity is not shrunk); inverse (linear
nets): (I + a_l m_l W_l)^{-1}.

The GNT rule (gnt.py) shares the local-loss machinery and replaces the targets.

    targets.py    ``TargetRule``: the forward pass, local losses and their gradients, diagnostics (shared with GNT)
    feedback.py   the feedback maps g_l (dense, conv, residual branch), their construction and their losses
    noise.py      the feedback-training noise: generators (``noise_rng``), levels sigma, the device counter
    rule.py       ``TP`` and ``DTP``: options, set-up, checkpoints, the targets
"""
from ..declared import FB_LOSSES, FEEDBACK, NOISE_RNGS, TARGET_OPTIONS, TP_OPTIONS
from .feedback import CONV_FB_LOSS, ConvFeedbackBranch, UpConvFeedback, has_conv_feedback
from .noise import resolve_noise_rng
from .rule import DTP, TP
from .targets import TargetRule

__all__ = ["CONV_FB_LOSS", "DTP", "FB_LOSSES", "FEEDBACK", "NOISE_RNGS", "TARGET_OPTIONS", "TP", "TP_OPTIONS",
           "ConvFeedbackBranch", "TargetRule", "UpConvFeedback", "has_conv_feedback", "resolve_noise_rng"]
