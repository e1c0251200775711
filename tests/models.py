"""Models the test workflows use to count side effects."""

from django.db import models


class Effect(models.Model):
    """One execution of a test step's side effect."""

    workflow_id = models.CharField(max_length=255)
    label = models.CharField(max_length=100)
    worker = models.CharField(max_length=255, blank=True)

    class Meta:
        app_label = "tests"
