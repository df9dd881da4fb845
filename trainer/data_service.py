"""A tf.data service cluster that decodes and resizes for the trainers when their own CPUs cannot keep up.

  python -m trainer.data_service --dispatcher --port=5050
  python -m trainer.data_service --worker --dispatcher_address=HOST:5050 [--port=5051] [--worker_address=NAME]

Each command starts its server and blocks until stopped (SIGTERM or Ctrl-C). Trainers given
--data_service=grpc://HOST:5050 send their input pipeline to the dispatcher (trainer.input.service); the workers run it,
in `distributed_epoch` mode: each epoch's examples are split among the workers and the trainers, each example read once,
not once per worker. The workers read the files themselves, so the data must be at the same path on every worker (a
shared volume, or gs://). See launch/data_service.yaml.
"""

from absl import flags

from trainer.command import usage
from trainer.errors import UserInputError, exit_on_user_error
from trainer.input.service import start_dispatcher, start_worker

flags.DEFINE_bool("dispatcher", False, "Start the dispatcher (one per cluster).")
flags.DEFINE_bool("worker", False, "Start a worker (as many as the input needs).")
flags.DEFINE_integer("port", 0, "Port to serve on (0: any free port; give the dispatcher a fixed one, e.g. 5050).")
flags.DEFINE_string("dispatcher_address", "", "HOST:PORT of the dispatcher (--worker).")
flags.DEFINE_string("worker_address", "", "Host name the dispatcher and trainers reach this worker at (--worker; "
                    "'' = this machine's name). Its port is --port.")
flags.DEFINE_string("work_dir", "", "Folder where the dispatcher keeps its state (--dispatcher), so that a "
                    "restarted dispatcher resumes its jobs; '' keeps it in memory only.")
flags.DEFINE_float("dispatcher_timeout", 60.0, "Seconds a worker waits for its dispatcher to answer before it "
                   "gives up with an error.")


def main(argv):
  given = flags.FLAGS
  with exit_on_user_error():
    usage.refuse_arguments(argv)
    if given.dispatcher == given.worker:
      raise UserInputError("Pass exactly one of --dispatcher and --worker.")
    if given.worker and not given.dispatcher_address:
      raise UserInputError("--worker needs --dispatcher_address=HOST:PORT of the dispatcher.")
    if given.dispatcher:
      server = start_dispatcher(given.port, given.work_dir)
    else:
      server = start_worker(given.dispatcher_address, given.port, given.worker_address, given.dispatcher_timeout)
  if given.dispatcher:
    print(f"tf.data service dispatcher serving at {server.target}.", flush=True)
  else:
    print(f"tf.data service worker serving for the dispatcher at {given.dispatcher_address}.", flush=True)
  server.join()  # Until the process is stopped.


_FLAG_GROUPS = {"role": ["dispatcher", "worker"],
                "server": ["port", "work_dir", "dispatcher_address", "worker_address", "dispatcher_timeout"]}


def run_script():
  usage.run(main, __doc__, _FLAG_GROUPS)


if __name__ == "__main__":
  run_script()
