"""The plain peer of bench/predict_peers.py: a hand-written Flask + scikit-learn /predict.

What a team typically writes to serve a joblib-pickled Pipeline, with nothing bucketml does
(no schema check, no ONNX, no metrics). Run by the benchmark under gunicorn:

    MODEL_PATH=model.joblib gunicorn --chdir bench --workers 1 --threads 8 flask_sklearn_server:app

POST /predict {"features": [[...], ...]} -> {"predictions": [...], "probabilities": [[...], ...]}
"""

import os

import joblib
import numpy as np
from flask import Flask, jsonify, request

app = Flask(__name__)
# Loaded at import: in every gunicorn worker, before it accepts requests.
model = joblib.load(os.environ["MODEL_PATH"])


@app.post("/predict")
def predict():
    body = request.get_json()
    features = np.asarray(body["features"], dtype=np.float64)
    # One pass over the model for both answers (predict() would be a second pass of predict_proba).
    probabilities = model.predict_proba(features)
    labels = model.classes_[probabilities.argmax(axis=1)]
    return jsonify(predictions=labels.tolist(), probabilities=probabilities.tolist())
