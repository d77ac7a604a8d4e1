"""The evaluation stage: weight-free metrics, image sets, the suite (fidelity, classifier, memorisation, 3D
consistency, drift probes), the evaluation config that samples models, and the HTML report."""
