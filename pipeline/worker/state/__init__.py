"""Raw transactions in: the handbook features computed in the stream, from state that survives.

A model trained with ``fraud-train fit --input raw`` is served on records that carry only
``transaction_id``, ``event_time``, ``CUSTOMER_ID``, ``TERMINAL_ID`` and ``TX_AMOUNT``, keyed
by customer. Customer windows need customer-keyed state and terminal windows terminal-keyed
state, so the worker runs two stages joined by a repartition topic (the Kafka Streams design;
one process runs both, N processes share them by partition)::

    input topic, key customer                        labels topic, key terminal
           |                                                   |
    [customer stage] -- customer windows -> <group>-customer-windows-changelog
           |   (+ watermark marks, one per input partition)    |
    <group>-by-terminal-repartition, key terminal              |
           |                                                   |
    [terminal stage] -- terminal windows + fraud labels -> <group>-terminal-windows-changelog
           |
    scoring -> alerts, dead letters

The modules, one job each:

- :mod:`.topology`: topic names, creation, co-partitioning, the start-up checks;
- :mod:`.fields`: what a raw record must carry before it touches state (keys, amount, time);
- :mod:`.store`: the in-memory stores, their changelog records, restore, the idle sweep;
- :mod:`.eventtime`: watermarks through the repartition topic, admission and pausing;
- :mod:`.hop`: the repartition topic's packed records (a batch's transactions per partition);
- :mod:`.stages`: the customer and terminal stages that use all of the above.

Window updates are idempotent by transaction id, so a batch replayed after a crash counts
nothing twice: under at-least-once only alerts and repartition records can be repeated, never
a window count.
"""

from pipeline.worker.state.fields import RAW_FIELDS, Bounds, entity_key
from pipeline.worker.state.stages import FeatureStages, Staged
from pipeline.worker.state.store import RestoreFailed, Restorer, Store
from pipeline.worker.state.topology import StateTopics, check_input_form, check_partitioning, prepare_topics

__all__ = ["RAW_FIELDS", "Bounds", "FeatureStages", "RestoreFailed", "Restorer", "Staged", "StateTopics", "Store",
           "check_input_form", "check_partitioning", "entity_key", "prepare_topics"]
