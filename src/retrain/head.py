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

from retrain.sampling import CLASS_BALANCE, ClassBalancedSampler

OPTIMIZERS = ("adam", "sgd", "momentum")


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
    GEMV_CLASSES = 4  # up to this many classes, per-class matrix-vector products beat one small matmul

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
        C, B = n_classes, self.batch_size
        # One parameter array P (C, D+1): row c holds class c's weights and, last, its bias. The optimizer
        # updates it in one pass, and with few classes each class's logits and weight gradient are one
        # matrix-vector product on a contiguous row (half the time of OpenBLAS's small-matrix path).
        # W (D, C) and b (C,) are views of it.
        P = np.zeros((C, d + 1), dtype=np.float32)
        W, b = P[:, :d].T, P[:, d]
        W[...] = np.clip(rng.normal(0.0, 0.001, size=(d, C)), -0.002, 0.002)
        moments = (np.zeros_like(P), np.zeros_like(P))  # Adam's m and v, or momentum's velocity (first)
        start = 0
        best = {"score": (-1.0, -np.inf), "W": W.copy(), "b": b.copy(), "step": 0}
        if resume_state is not None:
            W[...], b[...] = resume_state["W"], resume_state["b"]
            for m, key in zip(moments, ("m", "v")):
                m[:, :d] = resume_state["opt"][f"{key}W"].T
                m[:, d] = resume_state["opt"][f"{key}b"]
            start = int(resume_state["step"])
            best = dict(resume_state["best"])
            rng.bit_generator.state = resume_state["rng"]
        opt = {
            f"{key}{part}": view
            for key, m in zip(("m", "v"), moments)
            for part, view in (("W", m[:, :d].T), ("b", m[:, d]))
        }  # checkpoint views
        self._sampler = ClassBalancedSampler(y, C, self.class_balance)
        val_rng = np.random.default_rng(None if self.seed is None else self.seed + 1)
        # The steps up to the next evaluation (at most CHUNK) share one draw of indices and one gather,
        # so a step is a handful of NumPy calls on small arrays, all writing into buffers made here:
        # fresh 0.5 MB batch arrays would cost page faults every step. A resumed run starts at an
        # evaluation, where a chunk starts too, so it draws exactly the numbers the full run drew.
        chunk = max(1, min(eval_every, self.CHUNK))
        xc = np.empty((chunk * B, d), dtype=np.float32)  # (chunk*B, D)
        z = np.empty((C, B), dtype=np.float32)  # logits, then probabilities, then the loss gradient
        gP = np.empty_like(P)
        per_class = C <= self.GEMV_CLASSES
        eye = np.eye(C, dtype=np.float32)
        update = _Optimizer(self.optimizer, P, moments, self.learning_rate, self.weight_decay, d)
        with threadpool_limits(1, user_api="blas"):  # tiny matrix products run fastest on one thread
            step = start
            while step < self.steps:
                stop = min(self.steps, (step // eval_every + 1) * eval_every, step + chunk)
                k = stop - step
                idx = self._sampler.draw(rng, k * B)  # (k*B,)
                np.take(X, idx, axis=0, out=xc[: k * B], mode="clip")  # indices are valid; 'raise' buffers
                yc, wc = y[idx].reshape(k, B), self._sampler.weights[idx].reshape(k, B)
                scale = wc / wc.sum(axis=1, keepdims=True)  # (k, B): each step's loss weights, summing to 1
                onehot = np.ascontiguousarray(eye[yc].transpose(0, 2, 1))  # (k, C, B)
                for i in range(k):
                    xb = xc[i * B : (i + 1) * B]  # (B, D)
                    if per_class:
                        for c in range(C):
                            np.matmul(xb, P[c, :d], out=z[c])
                    else:
                        np.matmul(P[:, :d], xb.T, out=z)
                    z += P[:, d:]
                    z -= z.max(axis=0)
                    np.exp(z, out=z)
                    z /= z.sum(axis=0)  # softmax over classes
                    step += 1
                    evaluate = step % eval_every == 0 or step == self.steps
                    probs = z.T.copy() if evaluate else None  # (B, C)
                    z -= onehot[i]
                    z *= scale[i]  # the gradient of the batch's loss wrt the logits
                    if per_class:
                        for c in range(C):
                            np.matmul(xb.T, z[c], out=gP[c, :d])
                    else:
                        gP[:, :d] = z @ xb
                    z.sum(axis=1, out=gP[:, d])
                    update(gP, step)
                    if evaluate:
                        report, score = self._evaluate(
                            step, probs, yc[i], wc[i], W, b, X_val, y_val, validation_batch_size, val_rng
                        )
                        if score > best["score"]:
                            best = {"score": score, "W": W.copy(), "b": b.copy(), "step": step}
                        self.coef_, self.intercept_ = W, b
                        self._resume = {
                            "W": W,
                            "b": b,
                            "opt": opt,
                            "step": step,
                            "best": best,
                            "rng": rng.bit_generator.state,
                        }
                        if on_eval is not None:
                            on_eval(report, self)
        use_best = self.keep_best and X_val is not None and len(X_val) > 0
        self.best_step_ = best["step"] if use_best else self.steps
        self.coef_, self.intercept_ = (best["W"], best["b"]) if use_best else (W.copy(), b.copy())
        return self

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


class _Optimizer:
    """Updates P (C, D+1: weights, then the bias column; or (M, C, D+1) for M layers at once) in place from
    its gradient; weight decay spares the bias.

    Adam keeps m and v in ``moments``; momentum keeps its velocity in ``moments[0]``. Every
    temporary lives in buffers made once.
    """

    B1, B2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, name: str, P: np.ndarray, moments, lr: float, weight_decay: float, d: int):
        self.name, self.P, self.moments, self.lr, self.weight_decay, self.d = (
            name,
            P,
            moments,
            lr,
            weight_decay,
            d,
        )
        self.t1, self.t2 = np.empty_like(P), np.empty_like(P)

    def __call__(self, g: np.ndarray, t: int) -> None:
        P, t1, t2 = self.P, self.t1, self.t2
        if np.any(self.weight_decay):  # a number, or one per layer (an array that broadcasts against P)
            g[..., : self.d] += self.weight_decay * P[..., : self.d]
        if self.name == "sgd":
            np.multiply(g, self.lr, out=t1)
            P -= t1
        elif self.name == "momentum":
            m = self.moments[0]
            m *= 0.9
            m += g
            np.multiply(m, self.lr, out=t1)
            P -= t1
        else:  # Adam
            m, v = self.moments
            b1, b2 = self.B1, self.B2
            m *= b1
            np.multiply(g, 1 - b1, out=t1)
            m += t1  # m = b1 m + (1 - b1) g
            v *= b2
            np.multiply(g, 1 - b2, out=t1)
            t1 *= g
            v += t1  # v = b2 v + (1 - b2) g^2
            np.divide(m, 1 - b1**t, out=t1)
            t1 *= self.lr  # lr * m_hat
            np.divide(v, 1 - b2**t, out=t2)
            np.sqrt(t2, out=t2)
            t2 += self.EPS  # sqrt(v_hat) + eps
            t1 /= t2
            P -= t1
