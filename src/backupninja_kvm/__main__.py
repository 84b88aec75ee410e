from backupninja_kvm.cli import main

raise SystemExit(main())
