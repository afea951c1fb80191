// Package workflowcheck is a static analyzer for Kagzi workflow code. A workflow function
// is replayed after every resume, so between steps it must be deterministic; this
// analyzer reports what breaks that in the body of a function passed to sdk.Workflow:
//
//   - reading the clock (time.Now, time.Since, time.Until) or waiting on it
//     (time.Sleep, time.After, time.Tick, time.NewTimer, time.NewTicker);
//   - random numbers (math/rand, math/rand/v2, crypto/rand);
//   - go statements and select statements (scheduling order is not replayed);
//   - range over a map (iteration order differs between executions).
//
// Code inside a step body (the function passed to sdk.Step) runs once and is recorded, so
// it may do all of these and is not checked. Helpers called from a workflow are not
// followed: keep them deterministic or move their work into a step.
package workflowcheck

import (
	"go/ast"
	"go/types"
	"strings"

	"golang.org/x/tools/go/analysis"
	"golang.org/x/tools/go/analysis/passes/inspect"
	"golang.org/x/tools/go/ast/inspector"
)

// SDKPath is the import path of the SDK whose Workflow and Step calls are recognised.
const SDKPath = "github.com/kagzi/kagzi/libs/sdk"

// Analyzer reports non-deterministic code in workflow functions.
var Analyzer = &analysis.Analyzer{
	Name:     "workflowcheck",
	Doc:      "report non-deterministic code (clock, randomness, go, select, map range) in Kagzi workflow functions",
	Requires: []*analysis.Analyzer{inspect.Analyzer},
	Run:      run,
}

var bannedTime = map[string]string{
	"Now": "reads the clock", "Since": "reads the clock", "Until": "reads the clock",
	"Sleep": "waits on the clock (use ctx.Sleep)", "After": "waits on the clock (use ctx.Sleep)",
	"Tick": "waits on the clock", "NewTimer": "waits on the clock", "NewTicker": "waits on the clock",
	"AfterFunc": "waits on the clock",
}

var bannedRandPkgs = map[string]bool{"math/rand": true, "math/rand/v2": true, "crypto/rand": true}

func run(pass *analysis.Pass) (any, error) {
	ins := pass.ResultOf[inspect.Analyzer].(*inspector.Inspector)
	funcDecls := map[types.Object]*ast.FuncDecl{}
	for _, f := range pass.Files {
		for _, d := range f.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok && fd.Recv == nil {
				funcDecls[pass.TypesInfo.Defs[fd.Name]] = fd
			}
		}
	}
	ins.Preorder([]ast.Node{(*ast.CallExpr)(nil)}, func(n ast.Node) {
		call := n.(*ast.CallExpr)
		if !isSDKFunc(pass, call.Fun, "Workflow") || len(call.Args) < 2 {
			return
		}
		switch fn := ast.Unparen(call.Args[1]).(type) {
		case *ast.FuncLit:
			checkBody(pass, fn.Body)
		case *ast.Ident:
			if fd := funcDecls[pass.TypesInfo.Uses[fn]]; fd != nil && fd.Body != nil {
				checkBody(pass, fd.Body)
			}
		}
	})
	return nil, nil
}

// isSDKFunc reports whether fun names the SDK's function name (possibly instantiated
// with explicit type arguments).
func isSDKFunc(pass *analysis.Pass, fun ast.Expr, name string) bool {
	switch f := ast.Unparen(fun).(type) {
	case *ast.IndexExpr:
		fun = f.X
	case *ast.IndexListExpr:
		fun = f.X
	}
	var id *ast.Ident
	switch f := ast.Unparen(fun).(type) {
	case *ast.SelectorExpr:
		id = f.Sel
	case *ast.Ident:
		id = f
	default:
		return false
	}
	obj, ok := pass.TypesInfo.Uses[id].(*types.Func)
	return ok && obj.Name() == name && obj.Pkg() != nil && obj.Pkg().Path() == SDKPath
}

func checkBody(pass *analysis.Pass, body *ast.BlockStmt) {
	ast.Inspect(body, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.CallExpr:
			if isSDKFunc(pass, n.Fun, "Step") {
				// The step body is recorded, not replayed: skip it, check the rest.
				for i, arg := range n.Args {
					if i != 2 {
						ast.Inspect(arg, func(m ast.Node) bool { return m == arg || checkNode(pass, m) })
					}
				}
				return false
			}
			return checkNode(pass, n)
		default:
			return checkNode(pass, n)
		}
	})
}

// checkNode reports n if it is banned and says whether to look inside it.
func checkNode(pass *analysis.Pass, n ast.Node) bool {
	switch n := n.(type) {
	case *ast.GoStmt:
		pass.Reportf(n.Pos(), "go statement in workflow code: goroutine scheduling is not replayed; run concurrent work inside a step")
	case *ast.SelectStmt:
		pass.Reportf(n.Pos(), "select statement in workflow code: which case wins is not replayed")
	case *ast.RangeStmt:
		if t := pass.TypesInfo.TypeOf(n.X); t != nil {
			if _, ok := t.Underlying().(*types.Map); ok {
				pass.Reportf(n.Pos(), "range over a map in workflow code: iteration order differs between replays; sort the keys")
			}
		}
	case *ast.CallExpr:
		sel, ok := ast.Unparen(n.Fun).(*ast.SelectorExpr)
		if !ok {
			return true
		}
		obj, ok := pass.TypesInfo.Uses[sel.Sel].(*types.Func)
		if !ok || obj.Pkg() == nil {
			return true
		}
		path := obj.Pkg().Path()
		recv := obj.Type().(*types.Signature).Recv()
		switch {
		case path == "time" && recv == nil && bannedTime[obj.Name()] != "":
			pass.Reportf(n.Pos(), "time.%s in workflow code %s; do it inside a step", obj.Name(), bannedTime[obj.Name()])
		case bannedRandPkgs[path]:
			pass.Reportf(n.Pos(), "%s.%s in workflow code is random; draw it inside a step", lastElem(path), obj.Name())
		}
	}
	return true
}

func lastElem(path string) string {
	if i := strings.LastIndex(path, "/"); i >= 0 {
		if strings.HasPrefix(path[i+1:], "v") && strings.Count(path, "/") > 1 {
			return path[strings.LastIndex(path[:i], "/")+1:]
		}
		return path[i+1:]
	}
	return path
}
