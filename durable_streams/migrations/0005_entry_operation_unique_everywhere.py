from django.db import migrations

from durable_streams.backends import backend_for

# Where a database cannot hold the conditional ds_entry_unique_operation (Django leaves
# it out there), its backend adds an index that allows the same rows. Nothing changes
# on the others, nor in the migration state.
NAME = "ds_entry_unique_operation_set"


def forwards(apps, schema_editor):
    model = apps.get_model("durable_streams", "StreamEntry")
    backend_for(schema_editor.connection.alias).add_unique_where_not_null(
        schema_editor, model, ["stream", "operation"], NAME
    )


def backwards(apps, schema_editor):
    model = apps.get_model("durable_streams", "StreamEntry")
    backend_for(schema_editor.connection.alias).remove_unique_where_not_null(
        schema_editor, model, NAME
    )


class Migration(migrations.Migration):
    dependencies = [
        ("durable_streams", "0004_drop_indexes_covered_by_constraints"),
    ]

    # DDL outside a transaction: some databases cannot roll it back, and Django refuses it there.
    operations = [migrations.RunPython(forwards, backwards, atomic=False, elidable=False)]
