"""batches.py: dynamic sampling replaces a uniform tree by a question of its own source."""

from envs import Task
from tests.handmade import episode_tree


def test_uniform_trees_are_dropped_and_replaced_from_their_own_source():
    import batches

    one = [Task(f"q1-{i}", ["a"], "1hop") for i in range(5)]
    two = [Task(f"q2-{i}", ["a"], "2hop") for i in range(5)]
    uniform = {"q1-4", "q2-4", "q2-3"}  # queues pop from the end: the first picks of each source are uniform

    class Grower:
        """Completes the trees in the order they were added; records each add and each completion."""

        def __init__(self):
            self.queue, self.events = [], []

        def add(self, prompt, task):
            assert prompt == [len(task.question)]
            self.events.append(f"add {task.question}")
            self.queue.append(episode_tree(task, [(["answer"], 1.0), (["answer"], 1.0 if task.question in uniform else 0.0)]))
            return self.queue[-1]

        def grow(self):
            while self.queue:
                self.events.append(f"done {self.queue[0].task.question}")
                yield self.queue.pop(0)

    def draw(rounds, drop_uniform):
        grower = Grower()
        drawn, kept = batches.draw_trees([list(one), list(two)], [1, 1], grower, lambda t: [len(t.question)], rounds, drop_uniform)
        return grower.events, drawn, [t.task.question for t in kept]

    events, drawn, kept = draw(4, True)
    # each refill comes from the dropped tree's source and starts the moment the dropped tree is complete
    assert events == ["add q1-4", "add q2-4", "done q1-4", "add q1-3", "done q2-4", "add q2-3", "done q1-3",
                      "done q2-3", "add q2-2", "done q2-2"]
    assert kept == ["q1-3", "q2-2"]
    assert len(drawn) == 5 and sum(batches.is_uniform(t) for t in drawn) == 3
    # a cap on draws: the step trains on what it has; without dropping, the first draw is the batch
    events, drawn, kept = draw(2, True)
    assert kept == ["q1-3"] and len(drawn) == 4 and events[-1] == "done q2-3"
    events, drawn, kept = draw(1, True)
    assert kept == [] and len(drawn) == 2
    events, drawn, kept = draw(1, False)
    assert kept == ["q1-4", "q2-4"]
