"""`python -m bucketml.local.broker --manifests infra/knative --db PATH --subscriber NAME=URL ...`"""

from bucketml.local.broker.server import main

main()
