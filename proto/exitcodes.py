"""Exit codes of every shardps command, in one table."""

OK = 0              # finished normally (daemon: clean shutdown; client: job ended well)
FAILURE = 1         # client: the job ended FAILED or CANCELLED, or an RPC failed
USAGE = 2           # bad command line or bad input file (argparse uses 2 as well)
BIND_FAILED = 3     # daemon: could not bind its gRPC or metrics address
UNREACHABLE = 4     # the coordinator (or a server) did not answer within its deadline
STATE_ERROR = 5     # daemon: data or state dir unusable
TIMEOUT = 6         # client: --wait / local ran past its --timeout
REFUSED = 7         # daemon: the coordinator refused its registration for good (its node id
                    # is another role's, its --advertise address is too long): no retry helps
INTERRUPTED = 130   # SIGINT (Ctrl-C)
