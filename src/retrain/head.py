"""Stage 3: the new final layer, trained on cached bottleneck features.

A softmax (multinomial logistic) layer ``probs = softmax(x @ coef_ + intercept_)``
trained with mini-batch steps exactly as retrain.py counts them, but vectorised in
NumPy with hand-written gradients: 4,000 steps take about a second and do not need
PyTorch to be imported at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

OPTIMIZERS = ("adam", "sgd", "momentum")
CLASS_BALANCE = ("sample", "weight", "none")


@dataclass
class StepReport:
    step: int  # 1-based number of steps done
    train_accuracy: float
    cross_entropy: float
    validation_accuracy: float | None
    validation_count: int
    validation_cross_entropy: float | None = None  # over the whole validation set


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def cross_entropy(probs: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))
    return float(nll.mean() if weights is None else (nll * weights).sum() / weights.sum())


class NotFittedError(RuntimeError):
    pass


class SoftmaxHead:
    """Multinomial logistic regression trained by mini-batch steps.

    Hyperparameters are keyword-only; learned state ends in ``_``.
    ``class_balance``: ``"sample"`` draws a class uniformly, then an image of it (retrain.py's
    behaviour, the default); ``"weight"`` samples images uniformly and weights the loss by
    inverse class frequency; ``"none"`` samples images uniformly with equal weights.
    """

    CHUNK = 16  # most steps drawn and gathered at once (16 x batch x D floats: 8 MB at 100 x 1280)

    def __init__(
        self,
        *,
        steps: int = 4000,
        learning_rate: float = 0.01,
        batch_size: int = 100,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        class_balance: str = "sample",
        keep_best: bool = True,
        seed: int | None = None,
    ):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if class_balance not in CLASS_BALANCE:
            raise ValueError(f"class_balance must be one of {CLASS_BALANCE}, got {class_balance!r}")
        if steps < 1 or batch_size < 1 or learning_rate <= 0:
            raise ValueError(
                f"steps and batch_size must be >= 1 and learning_rate > 0, got steps={steps}, "
                f"batch_size={batch_size}, learning_rate={learning_rate}"
            )
        self.steps = steps
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.class_balance = class_balance
        self.keep_best = keep_best
        self.seed = seed

    # -- training ----------------------------------------------------------------------------
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        n_classes: int,
        X_val: np.ndarray | None = None,
        y_val: np.ndarray | None = None,
        eval_every: int = 10,
        validation_batch_size: int = -1,
        on_eval: Callable[[StepReport, SoftmaxHead], None] | None = None,
        resume_state: dict | None = None,
    ) -> SoftmaxHead:
        """Train on features ``X`` (N, D) with labels ``y`` (N,). Returns ``self``.

        Every ``eval_every`` steps and at the last step, ``on_eval`` receives the training
        accuracy and cross entropy of that step's batch and the validation accuracy.
        ``resume_state`` (from :meth:`state_dict`) continues an interrupted run.
        """
        X = np.ascontiguousarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        n, d = X.shape
        if n == 0:
            raise ValueError("no training images")
        rng = np.random.default_rng(self.seed)
        self.n_classes_ = n_classes
        self.n_features_in_ = d
        W = np.clip(rng.normal(0.0, 0.001, size=(d, n_classes)), -0.002, 0.002).astype(np.float32)
        b = np.zeros(n_classes, dtype=np.float32)
        opt = {"mW": np.zeros_like(W), "vW": np.zeros_like(W), "mb": np.zeros_like(b), "vb": np.zeros_like(b)}
        start = 0
        best = {"score": (-1.0, -np.inf), "W": W.copy(), "b": b.copy(), "step": 0}
        if resume_state is not None:
            W, b = resume_state["W"].copy(), resume_state["b"].copy()
            opt = {k: v.copy() for k, v in resume_state["opt"].items()}
            start = int(resume_state["step"])
            best = dict(resume_state["best"])
            rng.bit_generator.state = resume_state["rng"]
        self._sampler = _Sampler(y, n_classes, self.class_balance)
        val_rng = np.random.default_rng(None if self.seed is None else self.seed + 1)
        B, C = self.batch_size, n_classes
        # The steps up to the next evaluation (at most CHUNK) share one draw of indices and one gather,
        # so a step is a handful of NumPy calls on small arrays, all writing into buffers made here:
        # fresh 0.5 MB batch arrays would cost page faults every step. A resumed run starts at an
        # evaluation, where a chunk starts too, so it draws exactly the numbers the full run drew.
        chunk = max(1, min(eval_every, self.CHUNK))
        xc = np.empty((chunk * B, d), dtype=np.float32)  # (chunk*B, D)
        logits = np.empty((B, C), dtype=np.float32)
        eye = np.eye(C, dtype=np.float32)
        adam = _Adam(W, b, opt, self.learning_rate) if self.optimizer == "adam" else None
        gW = np.empty_like(W)
        with threadpool_limits(1, user_api="blas"):  # tiny matrix products run fastest on one thread
            step = start
            while step < self.steps:
                stop = min(self.steps, (step // eval_every + 1) * eval_every, step + chunk)
                k = stop - step
                idx = self._sampler.draw(rng, k * B)  # (k*B,)
                np.take(X, idx, axis=0, out=xc[: k * B], mode="clip")  # indices are valid; 'raise' buffers
                yc, wc = y[idx].reshape(k, B), self._sampler.weights[idx].reshape(k, B)
                scale = wc / wc.sum(axis=1, keepdims=True)  # (k, B): each step's loss weights, summing to 1
                onehot = eye[yc]  # (k, B, C)
                for i in range(k):
                    xb, yb = xc[i * B:(i + 1) * B], yc[i]
                    np.matmul(xb, W, out=logits)
                    logits += b
                    probs = softmax(logits)  # in place: (B, C)
                    step += 1
                    evaluate = step % eval_every == 0 or step == self.steps
                    report_probs = probs.copy() if evaluate else None
                    probs -= onehot[i]  # now the gradient of the loss wrt the logits
                    probs *= scale[i][:, None]
                    np.matmul(xb.T, probs, out=gW)  # (D, C)
                    gb = probs.sum(axis=0)  # (C,)
                    if adam is not None:
                        adam.step(gW, gb, step)
                    else:
                        self._update(W, b, gW, gb, opt, step)
                    if evaluate:
                        report, score = self._evaluate(
                            step, report_probs, yb, wc[i], W, b, X_val, y_val, validation_batch_size, val_rng
                        )
                        if score > best["score"]:
                            best = {"score": score, "W": W.copy(), "b": b.copy(), "step": step}
                        self.coef_, self.intercept_ = W, b
                        self._resume = {
                            "W": W, "b": b, "opt": opt, "step": step, "best": best, "rng": rng.bit_generator.state
                        }
                        if on_eval is not None:
                            on_eval(report, self)
        use_best = self.keep_best and X_val is not None and len(X_val) > 0
        self.best_step_ = best["step"] if use_best else self.steps
        self.coef_, self.intercept_ = (best["W"], best["b"]) if use_best else (W, b)
        return self

    def _update(self, W, b, gW, gb, opt, t: int) -> None:
        """SGD and momentum (Adam is _Adam)."""
        lr = self.learning_rate
        if self.weight_decay:
            gW = gW + self.weight_decay * W
        if self.optimizer == "sgd":
            W -= lr * gW
            b -= lr * gb
        elif self.optimizer == "momentum":
            opt["mW"] = 0.9 * opt["mW"] + gW
            opt["mb"] = 0.9 * opt["mb"] + gb
            W -= lr * opt["mW"]
            b -= lr * opt["mb"]
        else:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")

    def _evaluate(self, step, probs, yb, wb, W, b, X_val, y_val, validation_batch_size, val_rng):
        train_acc = float((probs.argmax(1) == yb).mean())
        xent = cross_entropy(probs, yb, wb)
        val_acc, val_n, score = None, 0, (0.0, 0.0)
        if X_val is not None and len(X_val):
            p_all = softmax(X_val @ W + b)
            correct = p_all.argmax(1) == y_val
            # Best-weights selection always uses the whole validation set: accuracy, then loss.
            score = (float(correct.mean()), -cross_entropy(p_all, y_val))
            if 0 < validation_batch_size < len(X_val):
                pick = val_rng.integers(0, len(X_val), size=validation_batch_size)
                val_acc, val_n = float(correct[pick].mean()), validation_batch_size
            else:
                val_acc, val_n = score[0], len(X_val)
        val_xent = -score[1] if val_acc is not None else None
        return StepReport(step, train_acc, xent, val_acc, val_n, val_xent), score

    # -- inference -------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("this SoftmaxHead is not fitted yet; call fit(X, y, n_classes=...) first")

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has shape {X.shape}, but this head expects (N, {self.n_features_in_}) features"
            )
        return softmax(X @ self.coef_ + self.intercept_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(axis=1)

    def state_dict(self) -> dict:
        """Everything needed to resume training exactly where the last evaluation left it."""
        self._check_fitted()
        return self._resume


class _Adam:
    """Adam on (W, b) in place, its moments kept in ``opt`` (mW, vW, mb, vb) for checkpoints."""

    B1, B2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, W: np.ndarray, b: np.ndarray, opt: dict, lr: float):
        self.params = ((W, "mW", "vW", np.empty_like(W), np.empty_like(W)),
                       (b, "mb", "vb", np.empty_like(b), np.empty_like(b)))
        self.opt, self.lr = opt, lr

    def step(self, gW: np.ndarray, gb: np.ndarray, t: int) -> None:
        b1, b2, opt = self.B1, self.B2, self.opt
        c1, c2 = 1 - b1**t, 1 - b2**t  # bias corrections
        for (p, m, v, t1, t2), g in zip(self.params, (gW, gb)):
            m, v = opt[m], opt[v]
            m *= b1
            np.multiply(g, 1 - b1, out=t1)
            m += t1  # m = b1 m + (1 - b1) g
            v *= b2
            np.multiply(g, 1 - b2, out=t1)
            t1 *= g
            v += t1  # v = b2 v + (1 - b2) g^2
            np.divide(m, c1, out=t1)
            t1 *= self.lr  # lr * m_hat
            np.divide(v, c2, out=t2)
            np.sqrt(t2, out=t2)
            t2 += self.EPS  # sqrt(v_hat) + eps
            t1 /= t2
            p -= t1


class _Sampler:
    """Draws training batches (with replacement) according to the class-balance policy."""

    def __init__(self, y: np.ndarray, n_classes: int, policy: str):
        self.policy = policy
        counts = np.bincount(y, minlength=n_classes)
        self.present = np.flatnonzero(counts)
        order = np.argsort(y, kind="stable")
        self.order = order
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts = counts
        self.n = len(y)
        if policy == "weight":
            self.weights = (len(y) / (len(self.present) * counts[y])).astype(np.float32)
        else:
            self.weights = np.ones(len(y), dtype=np.float32)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        if self.policy == "sample":
            cls = self.present[rng.integers(0, len(self.present), size=size)]
            offset = (rng.random(size) * self.counts[cls]).astype(np.int64)
            return self.order[self.starts[cls] + offset]
        return rng.integers(0, self.n, size=size)
