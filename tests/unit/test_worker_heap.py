import gc

from whenthen.worker.heap import freeze_start_up_heap


def test_the_start_up_heap_is_moved_out_of_the_collectors_way() -> None:
    kept: list[list[int]] = [[i] for i in range(1000)]  # containers the collector tracks
    assert gc.is_tracked(kept[0])
    try:
        freeze_start_up_heap()
        # No generation holds them any more: collections no longer walk them.
        walked = {id(o) for generation in range(3) for o in gc.get_objects(generation=generation)}
        assert id(kept) not in walked
        assert not any(id(x) in walked for x in kept)
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
