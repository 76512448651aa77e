"""`python -m bucketml.broker --manifests infra/knative --db PATH --subscriber NAME=URL ...`"""

from bucketml.broker.server import main

raise SystemExit(main())
