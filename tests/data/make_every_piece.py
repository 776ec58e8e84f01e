"""Writes tests/data/every_piece.fgz (+ .npz: the saved arrays, a training
forward at the saved dropout counter and an eval predict) with the fastgrad
this interpreter imports; the committed files come from fastgrad before the
epilogue table (run from outside the repository with main's install):
``python tests/data/make_every_piece.py tests/data/every_piece``."""
import sys
import numpy as np
import fastgrad as fg
print(fg.__file__, file=sys.stderr)
out = sys.argv[1]
rng = np.random.default_rng(15)
model = fg.Sequential([
    fg.Dense(5, 6, activation="gelu", norm="batch", weight_norm=True, dropout=0.1),
    fg.Residual(fg.Dense(6, 6, activation="leaky_relu", alpha=0.05, norm="layer", dropout=0.2)),
    fg.Residual(fg.Dense(6, 6, activation="tanh", weight_norm=True)),
    fg.Dense(6, 3, activation=None)], dtype="float64", seed=4)
opt = fg.Adam(model, lr=1e-2)
step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
for _ in range(3):
    step(rng.standard_normal((8, 5)), rng.integers(0, 3, 8))
fg.save(out + ".fgz", model, opt)
saved = {"params": model.params.copy(), "running_mean": model.running_mean.copy(),
         "running_var": model.running_var.copy(), "exp_avg": opt.state["exp_avg"].copy()}
x = np.random.default_rng(16).standard_normal((7, 5))
train_out = model.forward(x)                # dropout masks at the saved counter
model.eval()
eval_out = model.predict(x)
np.savez(out + ".npz", x=x, train_out=train_out, eval_out=eval_out, **saved)
