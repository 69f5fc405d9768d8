"""Scoring: using a trained model. Imports the layers below.

Test metrics and the evaluation reports and pictures, the model card, the served model (image bytes
only), and registered models verified and scored by the installed code (never their stored code).
"""
